//! Loops forever in `process`: the host must stop it at the call deadline.
use flowgate_sdk::prelude::*;

#[derive(Deserialize)]
pub struct Config {}

pub struct Spin;

impl Transform for Spin {
    type Config = Config;
    const NAME: &'static str = "spin";
    fn create(_: Config, input: &SchemaRef) -> Result<(Self, SchemaRef)> {
        Ok((Spin, input.clone()))
    }
    fn process(&mut self, _: RecordBatch) -> Result<Output> {
        let mut n = 0u64;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
}

export_transform!(Spin);
