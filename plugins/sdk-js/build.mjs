#!/usr/bin/env node
// Builds a Flowgate plugin component from a JavaScript module, offline once `npm install` has
// run: esbuild bundles the module, apache-arrow and the SDK into one ES module, and
// componentize-js (0.23, SpiderMonkey compiled to WebAssembly) makes it a component of the
// `flowgate:plugin` world in ./wit.
//
//   node flowgate/build.mjs [--entry src/plugin.js] [--out dist/NAME.wasm] [--wit wit]
//
// On a project's first build, when the packages are not installed yet, it runs `npm install`
// first (pinned by package.json; then offline), so `npm run build` is the one command.
//
// TypeScript too: esbuild strips the types (it does not check them), and `src/plugin.ts` is the
// default entry when it exists.
//
// Why this and not `jco componentize`: jco 1.x's preview2-shim 0.26 has no `/` preopen and fails
// with "failed to get path metadata"; componentize-js's own API works (with preview2-shim 0.25
// installed beside it, which package.json pins). AOT compilation (weval) would download a binary
// at build time, so the plugin runs SpiderMonkey's interpreter.

import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const root = process.cwd();

function option(name, fallback) {
    const i = process.argv.indexOf(name);
    return i > 0 && process.argv[i + 1] ? process.argv[i + 1] : fallback;
}

async function packageName() {
    const manifest = JSON.parse(await readFile(join(root, "package.json"), "utf8"));
    return (manifest.name || "plugin").replace(/^@[^/]+\//, "").replace(/-/g, "_");
}
const entry = resolve(root, option("--entry", existsSync(join(root, "src/plugin.ts")) ? "src/plugin.ts" : "src/plugin.js"));
const out = resolve(root, option("--out", null) ?? `dist/${await packageName()}.wasm`);
const wit = resolve(root, option("--wit", "wit"));
// A folder of its own (several builds may run at once), away from the output, which may be
// reached through a symbolic link; the entry imports by absolute path.
const work = await mkdtemp(join(tmpdir(), "flowgate-build-"));
// The component's entry: the host's logger wired into the SDK, and the plugin's `transform`.
await writeFile(
    join(work, "entry.js"),
    `import { log } from "flowgate:plugin/log@0.1.0";
import { setHostLog } from ${JSON.stringify(join(here, "flowgate.js"))};
import { transform as exported } from ${JSON.stringify(entry)};
setHostLog((level, message) => log(level, message));
export const transform = exported;
`,
);

// The packages the build needs, installed with `npm install` when missing (a new project).
try {
    await import("esbuild");
    await import("@bytecodealliance/componentize-js");
} catch (e) {
    if (e.code !== "ERR_MODULE_NOT_FOUND" || !existsSync(join(root, "package.json"))) throw e;
    console.log("the packages are not installed: running `npm install` (once)");
    const done = spawnSync("npm", ["install", "--no-audit", "--no-fund"], { cwd: root, stdio: "inherit" });
    if (done.status !== 0) {
        console.error(`npm install failed (exit ${done.status ?? done.error})`);
        process.exit(1);
    }
}

const started = Date.now();
let component;
try {
    const { build } = await import("esbuild");
    const bundle = join(work, "bundle.js");
    await build({
        entryPoints: [join(work, "entry.js")],
        bundle: true,
        format: "esm",
        // apache-arrow's browser build: no node built-ins.
        platform: "browser",
        target: "es2022",
        external: ["flowgate:*"],
        outfile: bundle,
        logLevel: "warning",
        legalComments: "none",
    });

    const { componentize } = await import("@bytecodealliance/componentize-js");
    ({ component } = await componentize({
        sourcePath: bundle,
        witPath: wit,
        worldName: "plugin",
        // No network: a plugin gets a logger, stdio (what it prints reaches the host's log) and
        // the clocks and randomness the host grants.
        disableFeatures: ["http", "fetch-event"],
    }));
    await mkdir(dirname(out), { recursive: true });
    await writeFile(out, component);
} finally {
    await rm(work, { recursive: true, force: true });
}
const mb = (component.byteLength / 1e6).toFixed(1);
console.log(`built ${relative(root, out)} (${mb} MB) in ${((Date.now() - started) / 1000).toFixed(1)} s`);
