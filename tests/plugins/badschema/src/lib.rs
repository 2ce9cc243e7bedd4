//! Declares one output schema and returns batches of another.
use flowgate_sdk::prelude::*;

#[derive(Deserialize)]
pub struct Config {}

pub struct BadSchema;

impl Transform for BadSchema {
    type Config = Config;
    const NAME: &'static str = "badschema";
    fn create(_: Config, _: &SchemaRef) -> Result<(Self, SchemaRef)> {
        Ok((
            BadSchema,
            Arc::new(Schema::new(vec![Field::new(
                "count",
                DataType::Int64,
                false,
            )])),
        ))
    }
    fn process(&mut self, batch: RecordBatch) -> Result<Output> {
        Ok(Output::batch(batch))
    }
}

export_transform!(BadSchema);
