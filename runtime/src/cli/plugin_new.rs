//! `flowgate plugin new NAME [--lang rust|js|python]`: a plugin project that builds on its own,
//! anywhere.
//!
//! The SDK is vendored into the new project (Rust: `vendor/flowgate-sdk/`; JavaScript and
//! Python: `flowgate/`; the WIT contract in `wit/`), copied from the SDK this binary was built with: the
//! project needs nothing from this repository, no git access, and its contract matches the host
//! that made it. A newer host refreshes the copy with `flowgate plugin new NAME --sdk-only`.

use std::path::{Path, PathBuf};

use clap::Args;

use super::UsageError;

/// `flowgate plugin new` arguments.
#[derive(Debug, Args)]
pub struct NewArgs {
    /// The plugin's name: lower case letters, digits, `-` and `_` (e.g. `price-filter`).
    name: String,
    /// The folder to create (default: ./NAME).
    #[arg(long, value_name = "DIR")]
    path: Option<PathBuf>,
    /// The plugin's language.
    #[arg(long, value_enum, default_value_t = Lang::Rust)]
    lang: Lang,
    /// Only write (or refresh) the vendored SDK and WIT contract in an existing plugin project.
    #[arg(long)]
    sdk_only: bool,
}

/// The languages `flowgate plugin new` writes a project in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// A Rust crate over the Rust SDK (`cargo build --target wasm32-wasip2`).
    Rust,
    /// A JavaScript package over the JavaScript SDK and `apache-arrow` (npm, esbuild,
    /// componentize-js).
    Js,
    /// A Python package over the Python SDK and its own Arrow IPC codec (componentize-py).
    Python,
}

/// The SDK's sources, as this binary was built with them.
const SDK_FILES: &[(&str, &str)] = &[
    (
        "src/lib.rs",
        include_str!("../../../plugins/sdk/src/lib.rs"),
    ),
    (
        "src/__private.rs",
        include_str!("../../../plugins/sdk/src/__private.rs"),
    ),
    (
        "src/columns.rs",
        include_str!("../../../plugins/sdk/src/columns.rs"),
    ),
    (
        "src/config.rs",
        include_str!("../../../plugins/sdk/src/config.rs"),
    ),
    (
        "src/error.rs",
        include_str!("../../../plugins/sdk/src/error.rs"),
    ),
    (
        "src/hash.rs",
        include_str!("../../../plugins/sdk/src/hash.rs"),
    ),
    (
        "src/ipc.rs",
        include_str!("../../../plugins/sdk/src/ipc.rs"),
    ),
    (
        "src/keys.rs",
        include_str!("../../../plugins/sdk/src/keys.rs"),
    ),
    (
        "src/log.rs",
        include_str!("../../../plugins/sdk/src/log.rs"),
    ),
    (
        "src/native.rs",
        include_str!("../../../plugins/sdk/src/native.rs"),
    ),
    (
        "src/output.rs",
        include_str!("../../../plugins/sdk/src/output.rs"),
    ),
    (
        "src/testing.rs",
        include_str!("../../../plugins/sdk/src/testing.rs"),
    ),
    (
        "src/transform.rs",
        include_str!("../../../plugins/sdk/src/transform.rs"),
    ),
];

/// The JavaScript SDK, vendored into a JavaScript plugin as `flowgate/`.
const JS_SDK_FILES: &[(&str, &str)] = &[
    (
        "flowgate/flowgate.js",
        include_str!("../../../plugins/sdk-js/flowgate.js"),
    ),
    (
        "flowgate/testing.js",
        include_str!("../../../plugins/sdk-js/testing.js"),
    ),
    (
        "flowgate/build.mjs",
        include_str!("../../../plugins/sdk-js/build.mjs"),
    ),
];

/// The Python SDK, vendored into a Python plugin as `flowgate/`.
const PY_SDK_FILES: &[(&str, &str)] = &[
    (
        "flowgate/__init__.py",
        include_str!("../../../plugins/sdk-python/flowgate/__init__.py"),
    ),
    (
        "flowgate/arrow.py",
        include_str!("../../../plugins/sdk-python/flowgate/arrow.py"),
    ),
    (
        "flowgate/testing.py",
        include_str!("../../../plugins/sdk-python/flowgate/testing.py"),
    ),
    (
        "flowgate/build.py",
        include_str!("../../../plugins/sdk-python/flowgate/build.py"),
    ),
    (
        "flowgate/_component.py",
        include_str!("../../../plugins/sdk-python/flowgate/_component.py"),
    ),
];

/// The Python scaffold's plugin, its tests, and what its build installs.
const PY_PLUGIN: &str = include_str!("../../../plugins/sdk-python/template/src/plugin.py");
const PY_TESTS_INIT: &str = include_str!("../../../plugins/sdk-python/template/tests/__init__.py");
const PY_TEST: &str = include_str!("../../../plugins/sdk-python/template/tests/test_plugin.py");
const PY_REQUIREMENTS: &str = include_str!("../../../plugins/sdk-python/requirements.txt");

/// The JavaScript scaffold's plugin and its test (`{{name}}` is the plugin's name).
const JS_PLUGIN: &str = include_str!("../../../plugins/sdk-js/template/src/plugin.js");
const JS_TEST: &str = include_str!("../../../plugins/sdk-js/template/test/plugin.test.js");

/// The versions the JavaScript SDK is built and tested with (`plugins/sdk-js/package.json`).
const JS_SDK_MANIFEST: &str = include_str!("../../../plugins/sdk-js/package.json");

/// The WIT contract the host implements.
const WIT: &str = include_str!("../../../wit/flowgate.wit");

/// The vendored SDK's manifest: the workspace's versions, written out.
const SDK_MANIFEST: &str = r#"# Vendored by `flowgate plugin new`: the Flowgate plugin SDK this host was built with.
# `flowgate plugin new NAME --sdk-only` refreshes it from a newer host.
[package]
name = "flowgate-sdk"
version = "0.1.0"
edition = "2024"
license = "Apache-2.0"
publish = false

[features]
testing = ["dep:arrow-json", "arrow/chrono-tz"]

[dependencies]
arrow = { version = "59", default-features = false, features = ["ipc"] }
arrow-json = { version = "59", optional = true }
serde = { version = "1", features = ["derive"] }
serde_json = "1"
serde_path_to_error = "0.1"
xxhash-rust = { version = "0.8", features = ["xxh3"] }

[target.'cfg(target_arch = "wasm32")'.dependencies]
wit-bindgen = { version = "0.63", default-features = false, features = ["macros", "realloc", "std"] }
"#;

fn manifest(crate_name: &str) -> String {
    format!(
        r#"[package]
name = "{crate_name}"
version = "0.1.0"
edition = "2024"
publish = false

# Its own workspace: the crate builds wherever it lives.
[workspace]

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
flowgate-sdk = {{ path = "vendor/flowgate-sdk" }}
arrow = {{ version = "59", default-features = false }}
serde = {{ version = "1", features = ["derive"] }}

# Small and quick to load: a plugin of 1–2 MB that `flowgate plugin test` compiles in a second.
[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
panic = "abort"
strip = true

# `cargo test` runs the logic natively: no debug info for the dependencies keeps their one native
# build short.
[profile.dev.package."*"]
debug = false
"#
    )
}

fn lib_rs(name: &str, type_name: &str) -> String {
    format!(
        r#"//! `{name}`: keeps the rows whose `column` is at least `min`; a row whose value is
//! missing goes to the dead letter with the reason.
use flowgate_sdk::prelude::*;

/// The step's `config:` block in the pipeline file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {{
    /// A float64 column of the input.
    pub column: String,
    /// Rows below this are dropped.
    pub min: f64,
}}

pub struct {type_name} {{
    column: usize,
    min: f64,
}}

impl Transform for {type_name} {{
    type Config = Config;
    const NAME: &'static str = "{name}";

    fn create(config: Config, input: &SchemaRef) -> Result<(Self, SchemaRef)> {{
        let column = column_index(input, &config.column, "column")?;
        // Same columns out as in.
        Ok(({type_name} {{ column, min: config.min }}, input.clone()))
    }}

    fn process(&mut self, batch: RecordBatch) -> Result<Output> {{
        let values = float64_column(&batch, self.column)?;
        let keep: arrow::array::BooleanArray = values
            .iter()
            .map(|v| Some(v.is_some_and(|v| v >= self.min)))
            .collect();
        let mut output = Output::batch(filter_record_batch(&batch, &keep)?);
        for row in 0..batch.num_rows() {{
            if values.is_null(row) {{
                output.reject(row, "the value is missing");
            }}
        }}
        Ok(output)
    }}
}}

export_transform!({type_name});

#[cfg(test)]
mod tests {{
    use super::*;

    #[test]
    fn keeps_rows_at_least_min_and_rejects_missing_values() {{
        let schema = Arc::new(Schema::new(vec![Field::new("price", DataType::Float64, true)]));
        let config = Config {{ column: "price".into(), min: 10.0 }};
        let (mut step, _) = {type_name}::create(config, &schema).unwrap();
        let batch = RecordBatch::try_new(
            schema,
            vec![Arc::new(Float64Array::from(vec![Some(12.0), Some(3.0), None]))],
        )
        .unwrap();
        let output = step.process(batch).unwrap();
        assert_eq!(output.num_rows(), 1);
        assert_eq!(output.rejected.len(), 1);
        assert_eq!(output.rejected[0].row, 2);
    }}
}}
"#
    )
}

/// A scaffold README's lines on using the built plugin from a pipeline.
fn usage(lib_name: &str, wasm: &str) -> String {
    format!(
        r#"Add it to a pipeline (a relative `plugin:` path is relative to the pipeline file):

```yaml
transforms:
  - name: {lib_name}
    plugin: {wasm}
    config:
      column: price
      min: 10
```
"#
    )
}

fn readme(name: &str, lib_name: &str, dir: &str) -> String {
    let usage = usage(
        lib_name,
        &format!("{dir}/target/wasm32-wasip2/release/{lib_name}.wasm"),
    );
    format!(
        r#"# {name}

A Flowgate transform plugin. Three commands:

```sh
cargo build --release --target wasm32-wasip2        # → target/wasm32-wasip2/release/{lib_name}.wasm
flowgate plugin test target/wasm32-wasip2/release/{lib_name}.wasm \
    --config sample/config.yaml --schema sample/schema.yaml --input sample/input.jsonl
cargo test                                          # the plugin's logic, natively
```

(`rustup target add wasm32-wasip2` once, if the build asks for it.)

{usage}
`src/lib.rs` is the plugin; `vendor/flowgate-sdk/` and `wit/` are the Flowgate SDK and contract
this crate was made with (`flowgate plugin new {name} --path . --sdk-only` refreshes them from a
newer Flowgate). A running pipeline picks up a rebuilt `.wasm` without a restart when its file
changes.
"#
    )
}

const SAMPLE_INPUT: &str = r#"{"symbol":"AAPL","price":12.5,"ts":"2025-11-12T14:30:01Z"}
{"symbol":"MSFT","price":3.25,"ts":"2025-11-12T14:30:02Z"}
{"symbol":"GOOG","price":null,"ts":"2025-11-12T14:30:03Z"}
{"symbol":"NVDA","price":10,"ts":"2025-11-12T14:30:04Z"}
"#;

const SAMPLE_SCHEMA: &str = "symbol: utf8\nprice: float64\nts: timestamp\n";

const SAMPLE_CONFIG: &str = "column: price\nmin: 10\n";

/// A JavaScript plugin's `package.json`: the SDK's dependencies, at the versions it is tested
/// with.
fn js_manifest(name: &str) -> anyhow::Result<String> {
    let sdk: serde_json::Value = serde_json::from_str(JS_SDK_MANIFEST)
        .map_err(|e| anyhow::anyhow!("the JavaScript SDK's package.json: {e}"))?;
    let manifest = serde_json::json!({
        "name": name,
        "version": "0.1.0",
        "private": true,
        "type": "module",
        "scripts": {
            "build": "node flowgate/build.mjs",
            "test": "node --test"
        },
        "dependencies": sdk["dependencies"],
        "devDependencies": sdk["devDependencies"],
    });
    Ok(serde_json::to_string_pretty(&manifest)? + "\n")
}

fn js_readme(name: &str, lib_name: &str, dir: &str) -> String {
    let usage = usage(lib_name, &format!("{dir}/dist/{lib_name}.wasm"));
    format!(
        r#"# {name}

A Flowgate transform plugin in JavaScript. With node 20 or newer:

```sh
npm run build                                       # → dist/{lib_name}.wasm
flowgate plugin test dist/{lib_name}.wasm \
    --config sample/config.yaml --schema sample/schema.yaml --input sample/input.jsonl
npm test                                            # the plugin's logic, under node
```

The first build runs `npm install` (apache-arrow, esbuild, componentize-js, at the versions
`package.json` pins); later builds are offline.

{usage}
`src/plugin.js` is the plugin; `flowgate/` is the Flowgate JavaScript SDK and its build script,
and `wit/` the contract, as this project was made with (`flowgate plugin new {name} --lang js
--path . --sdk-only` refreshes them from a newer Flowgate). A running pipeline picks up a rebuilt
`.wasm` without a restart when its file changes.

What to know:

- Columns are typed arrays: `batch.float64("price").values` is a `Float64Array`, int64 columns
  and µs timestamps are `BigInt64Array`s (exact; apache-arrow's own `get` on a timestamp gives
  float milliseconds). `batch.filter(keep)` and `batch.take(rows)` build the output.
- `output.reject(row, reason)` sends the row to the dead letter and takes it out of the batch it
  came in.
- Throw `invalidConfig(key, text)`, `badInput(text)` or `internal(text)` for the contract's
  errors. Any other exception is a bug: its stack is printed, the call traps, and Flowgate
  reports what was printed with the step's name (and isolates the row it failed on).
- TypeScript: rename `src/plugin.js` to `src/plugin.ts` and add types; the build strips them
  (esbuild does not check them).
- The component is 17 MB (SpiderMonkey runs the code interpreted) and takes seconds to compile
  on first load; Flowgate caches the compiled code.
"#
    )
}

/// Writes the vendored JavaScript SDK and the WIT contract under `root`.
fn write_js_sdk(root: &Path) -> anyhow::Result<()> {
    for (rel, text) in JS_SDK_FILES {
        write(root, rel, text)?;
    }
    write(root, "wit/flowgate.wit", WIT)
}

/// Writes a JavaScript plugin project.
fn new_js(root: &Path, name: &str, lib_name: &str) -> anyhow::Result<()> {
    write(root, "package.json", &js_manifest(name)?)?;
    write(root, "src/plugin.js", &JS_PLUGIN.replace("{{name}}", name))?;
    write(root, "test/plugin.test.js", JS_TEST)?;
    let absolute = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    write(
        root,
        "README.md",
        &js_readme(name, lib_name, &absolute.display().to_string()),
    )?;
    write(root, ".gitignore", "/node_modules\n/dist\n")?;
    write_js_sdk(root)
}

fn py_readme(name: &str, lib_name: &str, dir: &str) -> String {
    let usage = usage(lib_name, &format!("{dir}/dist/{lib_name}.wasm"));
    format!(
        r#"# {name}

A Flowgate transform plugin in Python. With Python 3.10 or newer:

```sh
python3 -m flowgate.build                           # → dist/{lib_name}.wasm
flowgate plugin test dist/{lib_name}.wasm \
    --config sample/config.yaml --schema sample/schema.yaml --input sample/input.jsonl
python3 -m unittest                                 # the plugin's logic, nothing to install
```

The first build installs componentize-py (pinned in `requirements.txt`) into `.venv/` when
neither your Python nor your PATH has it; later builds run offline.

{usage}
`src/plugin.py` is the plugin; `flowgate/` is the Flowgate Python SDK and its build script, and
`wit/` the contract, as this project was made with (`flowgate plugin new {name} --lang python
--path . --sdk-only` refreshes them from a newer Flowgate). A running pipeline picks up a rebuilt
`.wasm` without a restart when its file changes.

What to know:

- The plugin runs in CPython compiled to WebAssembly: the standard library and modules in `src/`
  only. Packages with C extensions (pyarrow, numpy, pandas) have no WebAssembly build.
- Columns come from the SDK's own Arrow codec (`flowgate.arrow`): ints, floats, bool, utf8,
  binary, timestamps (as integers in their unit: µs stay exact) and dates. `column.values` is a
  typed `memoryview`, `column.to_pylist()` gives Python values. Build masks at C speed
  (`compare(column, ">=", 10)`, `mask_and`, `null_rows`), then `batch.filter(mask)` or
  `batch.take(rows)`: a loop over the rows in Python costs about a microsecond a row.
- `output.reject(row, reason)` sends the row to the dead letter and takes it out of the batch it
  came in.
- Raise `InvalidConfig(key, text)`, `BadInput(text)` or `Internal(text)` for the contract's
  errors. Any other exception is a bug: its traceback is printed, the call traps, and Flowgate
  reports what was printed with the step's name (and isolates the row it failed on).
- The component is about 20 MB (the interpreter and the standard library) and takes seconds to
  compile on first load; Flowgate caches the compiled code.
"#
    )
}

/// Writes the vendored Python SDK and the WIT contract under `root`.
fn write_python_sdk(root: &Path) -> anyhow::Result<()> {
    for (rel, text) in PY_SDK_FILES {
        write(root, rel, text)?;
    }
    write(root, "requirements.txt", PY_REQUIREMENTS)?;
    write(root, "wit/flowgate.wit", WIT)
}

/// Writes a Python plugin project.
fn new_python(root: &Path, name: &str, lib_name: &str) -> anyhow::Result<()> {
    write(
        root,
        "pyproject.toml",
        &format!(
            "[project]\nname = \"{name}\"\nversion = \"0.1.0\"\nrequires-python = \">=3.10\"\n"
        ),
    )?;
    write(root, "src/plugin.py", &PY_PLUGIN.replace("{{name}}", name))?;
    write(root, "tests/__init__.py", PY_TESTS_INIT)?;
    write(root, "tests/test_plugin.py", PY_TEST)?;
    let absolute = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    write(
        root,
        "README.md",
        &py_readme(name, lib_name, &absolute.display().to_string()),
    )?;
    write(root, ".gitignore", "/.venv\n/dist\n__pycache__/\n")?;
    write_python_sdk(root)
}

/// The crate name, its library name (`-` → `_`) and a type name (`price-filter` → `PriceFilter`).
fn names(name: &str) -> Result<(String, String), UsageError> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        return Err(UsageError(format!(
            "`{name}` is not a plugin name: use lower case letters, digits, `-` and `_`, starting with a letter (e.g. `price-filter`)"
        )));
    }
    let lib_name = name.replace('-', "_");
    let type_name = lib_name
        .split('_')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut chars = p.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect::<String>();
    // Not a name the template or the SDK's prelude already uses (`output` → `OutputPlugin`).
    const TAKEN: &[&str] = &[
        "Config",
        "Output",
        "Result",
        "Error",
        "Transform",
        "Schema",
        "SchemaRef",
        "Field",
        "Arc",
        "Rejected",
        "Duration",
        "OrderedMap",
        "DataType",
        "RecordBatch",
        "Array",
        "ArrayRef",
        "Deserialize",
        "Tests",
    ];
    let type_name = if TAKEN.contains(&type_name.as_str()) {
        format!("{type_name}Plugin")
    } else {
        type_name
    };
    Ok((lib_name, type_name))
}

fn write(root: &Path, rel: &str, text: &str) -> anyhow::Result<()> {
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", parent.display()))?;
    }
    std::fs::write(&path, text).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

/// Writes the vendored SDK and WIT contract under `root`.
fn write_sdk(root: &Path) -> anyhow::Result<()> {
    let sdk = root.join("vendor/flowgate-sdk");
    if sdk.exists() {
        std::fs::remove_dir_all(&sdk)
            .map_err(|e| anyhow::anyhow!("replacing {}: {e}", sdk.display()))?;
    }
    write(root, "vendor/flowgate-sdk/Cargo.toml", SDK_MANIFEST)?;
    for (rel, text) in SDK_FILES {
        write(root, &format!("vendor/flowgate-sdk/{rel}"), text)?;
    }
    write(root, "wit/flowgate.wit", WIT)
}

/// Runs `flowgate plugin new`.
pub fn run(args: NewArgs) -> anyhow::Result<std::process::ExitCode> {
    let (lib_name, type_name) = names(&args.name)?;
    let root = args.path.unwrap_or_else(|| PathBuf::from(&args.name));
    if args.sdk_only {
        let manifest = match args.lang {
            Lang::Rust => "Cargo.toml",
            Lang::Js => "package.json",
            Lang::Python => "pyproject.toml",
        };
        if !root.join(manifest).is_file() {
            return Err(UsageError(format!(
                "`{}` has no {manifest}: `--sdk-only` refreshes the SDK of an existing plugin project",
                root.display()
            ))
            .into());
        }
        match args.lang {
            Lang::Rust => write_sdk(&root)?,
            Lang::Js => write_js_sdk(&root)?,
            Lang::Python => write_python_sdk(&root)?,
        }
        println!(
            "refreshed the Flowgate SDK and contract in {}",
            root.display()
        );
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let occupied = std::fs::read_dir(&root).is_ok_and(|mut entries| entries.next().is_some());
    if occupied {
        return Err(UsageError(format!(
            "`{}` exists and is not empty: give a new folder with `--path`",
            root.display()
        ))
        .into());
    }
    match args.lang {
        Lang::Rust => {
            write(&root, "Cargo.toml", &manifest(&args.name))?;
            write(&root, "src/lib.rs", &lib_rs(&lib_name, &type_name))?;
            let absolute = std::fs::canonicalize(&root).unwrap_or_else(|_| root.clone());
            write(
                &root,
                "README.md",
                &readme(&args.name, &lib_name, &absolute.display().to_string()),
            )?;
            write(&root, ".gitignore", "/target\n")?;
            write_sdk(&root)?;
        }
        Lang::Js => new_js(&root, &args.name, &lib_name)?,
        Lang::Python => new_python(&root, &args.name, &lib_name)?,
    }
    write(&root, "sample/input.jsonl", SAMPLE_INPUT)?;
    write(&root, "sample/schema.yaml", SAMPLE_SCHEMA)?;
    write(&root, "sample/config.yaml", SAMPLE_CONFIG)?;
    println!("created plugin `{}` in {}", args.name, root.display());
    println!();
    println!("  cd {}", root.display());
    let sample =
        "--config sample/config.yaml --schema sample/schema.yaml --input sample/input.jsonl";
    match args.lang {
        Lang::Rust => {
            println!("  cargo build --release --target wasm32-wasip2");
            println!(
                "  flowgate plugin test target/wasm32-wasip2/release/{lib_name}.wasm {sample}"
            );
        }
        Lang::Js => {
            println!("  npm run build");
            println!("  flowgate plugin test dist/{lib_name}.wasm {sample}");
        }
        Lang::Python => {
            println!("  python3 -m flowgate.build");
            println!("  flowgate plugin test dist/{lib_name}.wasm {sample}");
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sdk_source_is_vendored() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk/src");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| format!("src/{}", e.unwrap().file_name().to_string_lossy()))
            .collect();
        on_disk.sort();
        let mut vendored: Vec<String> = SDK_FILES.iter().map(|(p, _)| p.to_string()).collect();
        vendored.sort();
        assert_eq!(
            vendored, on_disk,
            "plugin_new.rs must embed every SDK source file"
        );
        // The vendored manifest asks for the versions the workspace builds with.
        let workspace =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"))
                .unwrap();
        for dep in [
            "arrow = { version = \"59\"",
            "wit-bindgen = { version = \"0.63\"",
            "xxhash-rust = { version = \"0.8\"",
        ] {
            assert!(
                workspace.contains(dep) && SDK_MANIFEST.contains(dep),
                "{dep}"
            );
        }
    }

    #[test]
    fn a_javascript_plugin_pins_the_versions_the_sdk_is_tested_with() {
        let manifest: serde_json::Value =
            serde_json::from_str(&js_manifest("price-filter").unwrap()).unwrap();
        assert_eq!(manifest["name"], "price-filter");
        assert_eq!(manifest["dependencies"]["apache-arrow"], "21.2.0");
        assert_eq!(
            manifest["devDependencies"]["@bytecodealliance/componentize-js"],
            "0.23.0"
        );
        // componentize-js 0.23 needs this one beside it (it lists it only for its own tests).
        assert_eq!(
            manifest["devDependencies"]["@bytecodealliance/preview2-shim"],
            "0.25.0"
        );
        assert!(JS_PLUGIN.contains("{{name}}"));
        // Every SDK file the scaffold imports is vendored.
        for import in ["../flowgate/flowgate.js", "../flowgate/testing.js"] {
            let file = import.trim_start_matches("../");
            assert!(
                JS_PLUGIN.contains(import) || JS_TEST.contains(import),
                "{import}"
            );
            assert!(JS_SDK_FILES.iter().any(|(p, _)| *p == file), "{file}");
        }
    }

    #[test]
    fn a_python_plugin_vendors_every_sdk_module_and_pins_componentize_py() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk-python/flowgate");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|f| f.ends_with(".py"))
            .map(|f| format!("flowgate/{f}"))
            .collect();
        on_disk.sort();
        let mut vendored: Vec<String> = PY_SDK_FILES.iter().map(|(p, _)| p.to_string()).collect();
        vendored.sort();
        assert_eq!(
            vendored, on_disk,
            "plugin_new.rs must embed every module of the Python SDK"
        );
        assert!(PY_REQUIREMENTS.contains("componentize-py==0.25.1"));
        assert!(PY_PLUGIN.contains("{{name}}"));
    }

    #[test]
    fn names_become_crate_library_and_type_names() {
        assert_eq!(
            names("price-filter").unwrap(),
            ("price_filter".to_string(), "PriceFilter".to_string())
        );
        assert!(names("Price").is_err() && names("9x").is_err() && names("a b").is_err());
        assert_eq!(names("output").unwrap().1, "OutputPlugin");
    }
}
