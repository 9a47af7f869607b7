// What the bench programs share: a child never outlives the orchestrator, a server child listens
// on loopback and announces its port on stdout, and every program reads `--flag value` arguments.

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

/**
 * Walks `--flag value` (or `--flag=value`) arguments: yields each flag with a getter that takes its
 * value, throwing when it is missing. A flag whose getter is not called takes no value.
 */
export function* flags(args: string[]): Generator<[flag: string, value: () => string]> {
  for (let i = 0; i < args.length; i++) {
    const eq = args[i].indexOf("=");
    const flag = eq > 0 ? args[i].slice(0, eq) : args[i];
    const inline = eq > 0 ? args[i].slice(eq + 1) : undefined;
    yield [flag, () => {
      const value = inline ?? args[++i];
      if (value === undefined) throw new Error(`missing value for ${flag}`);
      return value;
    }];
  }
}
