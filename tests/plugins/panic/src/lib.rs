//! Panics on a row whose `symbol` is `POISON` (an `unwrap` on a missing value, as a plugin author
//! might write): the host must report the panic's message and source line, not a backtrace of
//! `<wasm function N>` frames.
use flowgate_sdk::prelude::*;

#[derive(Deserialize)]
pub struct Config {}

pub struct Panic;

impl Transform for Panic {
    type Config = Config;
    const NAME: &'static str = "panic";
    fn create(_: Config, input: &SchemaRef) -> Result<(Self, SchemaRef)> {
        Ok((Panic, input.clone()))
    }
    fn process(&mut self, batch: RecordBatch) -> Result<Output> {
        let symbols = batch.column(0).as_string::<i32>();
        for i in 0..batch.num_rows() {
            let price: Option<f64> = (symbols.value(i) != "POISON").then_some(1.0);
            #[allow(clippy::unwrap_used)] // the point of this plugin
            std::hint::black_box(price.unwrap());
        }
        Ok(Output::batch(batch))
    }
}

export_transform!(Panic);
