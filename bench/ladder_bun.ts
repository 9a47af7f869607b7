// Bun's rows of the ladder (issue 13, Bun's part), in one interleaved run: Bun's JS pass-through (a pull stream),
// Bun's floor for a streaming bridge (fetch into a direct stream, Dify's bytes untranslated:
// bench/stalled_bun_proxy.ts), and main.ts on Bun with its per-request pieces switched off one at a time.
// The ratio column is to the first row, Bun's JS pass-through.
//
//   deno run -A bench/ladder_bun.ts [--rounds 5] [--seconds 3] [--main main.ts]
import { flags } from "./child.ts";
import { DEFAULTS, ladder, type Options, ROWS } from "./ladder/ladder.ts";

const ROOT = new URL("..", import.meta.url).pathname.replace(/\/$/, "");
const o: Options = { ...DEFAULTS, seconds: 3, latencySeconds: 1 };
for (const [flag, value] of flags(Deno.args)) {
  if (flag === "--rounds") o.rounds = Number(value());
  else if (flag === "--seconds") o.seconds = Number(value());
  else if (flag === "--main") o.main = value();
  else throw new Error(`unknown argument ${flag}`);
}

const bunMain = (key: string, label: string, env: Record<string, string>) =>
  ROWS.push({
    key,
    label,
    kind: "openai",
    cmd: (o) => ["bun", o.main],
    env: (_o, dir, key) => ({
      DIFY_API_KEY: "app-bench",
      KV_PATH: `${dir}/${key}.kv`,
      BUN_CONFIG_MAX_HTTP_REQUESTS: "2048",
      ...env,
    }),
  });
ROWS.push({
  key: "bun-floor",
  label: "Bun floor: fetch into a direct stream, untranslated",
  kind: "openai",
  answers: "dify",
  cmd: () => ["bun", `${ROOT}/bench/stalled_bun_proxy.ts`],
  env: () => ({ DIFY_API_KEY: "app-bench", MODE: "fetch", BUN_CONFIG_MAX_HTTP_REQUESTS: "2048" }),
});
bunMain("bun-main", "main.ts on Bun", {});
bunMain("bun-off", "main.ts on Bun, CONVERSATION_MODE=off", { CONVERSATION_MODE: "off" });
bunMain("bun-nometrics", "main.ts on Bun, METRICS=off", { METRICS: "off" });
bunMain("bun-bare", "main.ts on Bun, off + METRICS=off + IDLE_CONNECTION_SECONDS=0", {
  CONVERSATION_MODE: "off",
  METRICS: "off",
  IDLE_CONNECTION_SECONDS: "0",
});

o.rows = ["bun-js", "bun-floor", "bun-main", "bun-off", "bun-nometrics", "bun-bare"];
console.log((await ladder(o)).replaceAll("× BYOB", "× Bun JS pass-through").replaceAll("BYOB µs", "JS pass µs"));
