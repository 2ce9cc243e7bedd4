//! The pipeline parser on arbitrary text: interpolation, YAML, the model, the checks and the
//! key locator behind every located error. It must never panic; an error must name the file.
#![no_main]

use std::collections::HashMap;
use std::path::Path;

use flowgate_fuzz::config::Pipeline;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("/nonexistent/fuzz.yaml");
    match Pipeline::parse(text, file, &HashMap::new()) {
        Ok(pipeline) => {
            // Locating keys runs on every later error: exercise it on the parsed text.
            for (i, _) in pipeline.spec.transforms.iter().enumerate() {
                let _ = pipeline.locate_key(&format!("transforms[{i}].config.rules"));
            }
            let _ = pipeline.locate_key("sinks.bars.delta.path");
        }
        Err(e) => assert!(e.to_string().contains("fuzz.yaml"), "{e}"),
    }
});
