// What every bench child process shares: it never outlives the orchestrator, and a server child
// listens on loopback and announces its port on stdout.

/**
 * Exits with `code` once process `parent` is gone (checked once a second). The timer is unref'd, so
 * it never keeps a finished process alive.
 */
export function exitWithParent(parent: number, code = 0): void {
  if (!(parent > 0)) return;
  const id = setInterval(() => {
    try {
      Deno.statSync(`/proc/${parent}`);
    } catch {
      clearInterval(id);
      Deno.exit(code);
    }
  }, 1000);
  Deno.unrefTimer(id);
}

/** Serves `handler` on 127.0.0.1 and prints `listening <port>` for the orchestrator. */
export function serveOnLoopback(port: number, handler: (req: Request) => Response | Promise<Response>): void {
  Deno.serve({ hostname: "127.0.0.1", port, onListen: ({ port }) => console.log(`listening ${port}`) }, handler);
}
