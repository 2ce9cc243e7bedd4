//! Tries the ambient authority a plugin must not have, and reports what it got.
use flowgate_sdk::prelude::*;

#[derive(Deserialize)]
pub struct Config {}

pub struct Escape;

fn outcome<T: std::fmt::Debug, E: std::fmt::Display>(r: std::result::Result<T, E>) -> String {
    match r {
        Ok(v) => format!("allowed: {v:?}"),
        Err(e) => format!("denied: {e}"),
    }
}

impl Transform for Escape {
    type Config = Config;
    const NAME: &'static str = "escape";
    fn create(_: Config, _: &SchemaRef) -> Result<(Self, SchemaRef)> {
        let schema = Schema::new(vec![
            Field::new("probe", DataType::Utf8, false),
            Field::new("outcome", DataType::Utf8, false),
        ]);
        Ok((Escape, Arc::new(schema)))
    }
    fn process(&mut self, _: RecordBatch) -> Result<Output> {
        let probes = [
            (
                "read /etc/hostname",
                outcome(std::fs::read_to_string("/etc/hostname")),
            ),
            ("list /", outcome(std::fs::read_dir("/").map(|d| d.count()))),
            (
                "write /tmp",
                outcome(std::fs::write("/tmp/flowgate-escape", b"x")),
            ),
            ("env vars", format!("{} visible", std::env::vars().count())),
            (
                "env FLOWGATE_SECRET",
                outcome(std::env::var("FLOWGATE_SECRET")),
            ),
            (
                "clock",
                format!(
                    "{} s since epoch",
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0)
                ),
            ),
            (
                "tcp connect",
                outcome(std::net::TcpStream::connect("127.0.0.1:5432")),
            ),
        ];
        let schema = Arc::new(Schema::new(vec![
            Field::new("probe", DataType::Utf8, false),
            Field::new("outcome", DataType::Utf8, false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from_iter_values(probes.iter().map(|p| p.0))),
                Arc::new(StringArray::from_iter_values(
                    probes.iter().map(|p| p.1.as_str()),
                )),
            ],
        )?;
        Ok(Output::batch(batch))
    }
}

export_transform!(Escape);
