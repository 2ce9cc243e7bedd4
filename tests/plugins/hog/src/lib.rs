//! Allocates `mb` MiB in `process` (for a non-empty batch): past the host's memory cap this must fail, not harm the host.
use flowgate_sdk::prelude::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    mb: usize,
}

pub struct Hog {
    mb: usize,
}

impl Transform for Hog {
    type Config = Config;
    const NAME: &'static str = "hog";
    fn create(config: Config, input: &SchemaRef) -> Result<(Self, SchemaRef)> {
        Ok((Hog { mb: config.mb }, input.clone()))
    }
    fn process(&mut self, batch: RecordBatch) -> Result<Output> {
        if batch.num_rows() == 0 {
            return Ok(Output::empty());
        }
        let block = vec![7u8; self.mb << 20];
        std::hint::black_box(&block);
        Ok(Output::batch(batch))
    }
}

export_transform!(Hog);
