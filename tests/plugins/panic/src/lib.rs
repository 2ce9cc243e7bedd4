//! Panics on a row whose `symbol` is `POISON` (an `unwrap` on a missing value, as a plugin author
//! might write): the host must report the panic's message and source line, not a backtrace of
//! `<wasm function N>` frames. On a row whose `symbol` is `SHOUT` it prints to stderr and then
//! aborts, as a JavaScript or Python plugin does on an uncaught exception: the host must put what
//! it printed in the trap's error. On `CHATTY` it prints and carries on. It keeps state, the number of rows it passed on (its snapshot), so
//! the poison-record tests can tell whether a rebuilt instance ends where it should.
use flowgate_sdk::prelude::*;

#[derive(Deserialize)]
pub struct Config {}

pub struct Panic {
    passed: u64,
}

impl Transform for Panic {
    type Config = Config;
    const NAME: &'static str = "panic";
    const STATE_VERSION: u32 = 1;

    fn create(_: Config, input: &SchemaRef) -> Result<(Self, SchemaRef)> {
        Ok((Panic { passed: 0 }, input.clone()))
    }

    fn process(&mut self, batch: RecordBatch) -> Result<Output> {
        let symbols = batch.column(0).as_string::<i32>();
        for i in 0..batch.num_rows() {
            match symbols.value(i) {
                "SHOUT" => {
                    eprintln!("Traceback (most recent call last):");
                    eprintln!("ValueError: row {i} is shouting");
                    std::process::abort();
                }
                "CHATTY" => eprintln!("row {i} is chatty"),
                _ => {}
            }
            let price: Option<f64> = (symbols.value(i) != "POISON").then_some(1.0);
            #[allow(clippy::unwrap_used)] // the point of this plugin
            std::hint::black_box(price.unwrap());
        }
        self.passed += batch.num_rows() as u64;
        Ok(Output::batch(batch))
    }

    fn snapshot(&self) -> Result<Vec<u8>> {
        Ok(self.passed.to_le_bytes().to_vec())
    }

    fn restore(&mut self, _version: u32, state: &[u8]) -> Result<()> {
        let bytes: [u8; 8] = state
            .try_into()
            .map_err(|_| Error::bad_input("state is not 8 bytes"))?;
        self.passed = u64::from_le_bytes(bytes);
        Ok(())
    }
}

export_transform!(Panic);
