// Runs a wasm32-wasip1 command module under Node's V8, the engine Envoy runs wasm filters in.
// `node --no-liftoff scripts/run-wasi.js FILE.wasm`: --no-liftoff compiles with TurboFan only, as
// Envoy configures V8.
const { WASI } = require('node:wasi');
const fs = require('node:fs');

(async () => {
  const wasi = new WASI({ version: 'preview1', args: [process.argv[2]], env: {} });
  const module = await WebAssembly.compile(fs.readFileSync(process.argv[2]));
  const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
  process.exitCode = wasi.start(instance) ?? 0;
  process.exit();
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
