//! A PostgreSQL table, exactly once: each epoch's rows and, per source partition, the position
//! covered (last offset and checkpoint epoch) are written in one transaction. Positions live in a
//! table the sink owns (`flowgate_offsets`, one row per pipeline, sink and partition, beside the
//! data table), read on start, the way the JDBC sinks of Kafka Connect and Flink keep theirs.
//! Rows go in with binary `COPY`; `mode: upsert` copies into a temporary table and merges it with
//! `INSERT … ON CONFLICT (key) DO UPDATE`.

use std::str::FromStr;
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{
    DataType, Date32Type, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type,
    TimeUnit, TimestampMicrosecondType, UInt8Type, UInt16Type, UInt32Type,
};
use arrow::record_batch::RecordBatch;
use bytes::BytesMut;
use tokio::runtime::Runtime;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, NoTls};

use super::{Fence, Fit, Position, Positions, Sink, SinkError, TableShape, fence, positions_moved};
use crate::config::PostgresMode;

/// The table of committed positions, beside the sink's table.
const OFFSETS: &str = "flowgate_offsets";
/// The temporary table an upsert copies into (one per connection, emptied at each commit).
const STAGE: &str = "flowgate_stage";

/// Quotes an identifier: `a"b` → `"a""b"`.
fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// The PostgreSQL type a stage column is stored as, by `udt_name`.
fn pg_type(data_type: &DataType) -> Option<(Type, &'static str)> {
    Some(match data_type {
        DataType::Boolean => (Type::BOOL, "bool"),
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => (Type::INT2, "int2"),
        DataType::Int32 | DataType::UInt16 => (Type::INT4, "int4"),
        DataType::Int64 | DataType::UInt32 => (Type::INT8, "int8"),
        DataType::Float32 => (Type::FLOAT4, "float4"),
        DataType::Float64 => (Type::FLOAT8, "float8"),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => (Type::TEXT, "text"),
        DataType::Timestamp(_, _) => (Type::TIMESTAMPTZ, "timestamptz"),
        DataType::Date32 => (Type::DATE, "date"),
        _ => return None,
    })
}

/// `user@host:port/db`, from a connection URL or key=value string, never with the password.
fn describe_url(url: &str) -> String {
    match tokio_postgres::Config::from_str(url) {
        Ok(c) => {
            let host = match c.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                #[cfg(unix)]
                Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
                None => "localhost".into(),
            };
            let port = c.get_ports().first().copied().unwrap_or(5432);
            format!(
                "{}@{host}:{port}/{}",
                c.get_user().unwrap_or("?"),
                c.get_dbname().unwrap_or("?")
            )
        }
        Err(_) => "(a connection URL that does not parse)".into(),
    }
}

/// One value of a row, as `COPY` sends it.
#[derive(Debug)]
enum Cell<'a> {
    Null,
    Bool(bool),
    I16(i16),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    Text(&'a str),
    /// Text that held NUL characters, which PostgreSQL text cannot: each became U+FFFD.
    Replaced(String),
    /// Microseconds since 1970, UTC.
    Micros(i64),
    /// Days since 1970.
    Days(i32),
}

impl ToSql for Cell<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match *self {
            Cell::Null => Ok(IsNull::Yes),
            Cell::Bool(v) => v.to_sql(ty, out),
            Cell::I16(v) => v.to_sql(ty, out),
            Cell::I32(v) => v.to_sql(ty, out),
            Cell::I64(v) => v.to_sql(ty, out),
            Cell::F32(v) => v.to_sql(ty, out),
            Cell::F64(v) => v.to_sql(ty, out),
            Cell::Text(v) => v.to_sql(ty, out),
            Cell::Replaced(ref v) => v.as_str().to_sql(ty, out),
            Cell::Micros(us) => chrono::DateTime::from_timestamp_micros(us)
                .ok_or("timestamp out of range")?
                .to_sql(ty, out),
            Cell::Days(days) => chrono::DateTime::from_timestamp(i64::from(days) * 86_400, 0)
                .ok_or("date out of range")?
                .date_naive()
                .to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn text(s: &str) -> Cell<'_> {
    if s.contains('\0') {
        Cell::Replaced(s.replace('\0', "\u{FFFD}"))
    } else {
        Cell::Text(s)
    }
}

/// Row `i` of `array` (a column of a batch shaped by [`TableShape`]).
fn cell(array: &dyn Array, i: usize) -> Cell<'_> {
    if array.is_null(i) {
        return Cell::Null;
    }
    match array.data_type() {
        DataType::Boolean => Cell::Bool(array.as_boolean().value(i)),
        DataType::Int8 => Cell::I16(i16::from(array.as_primitive::<Int8Type>().value(i))),
        DataType::UInt8 => Cell::I16(i16::from(array.as_primitive::<UInt8Type>().value(i))),
        DataType::Int16 => Cell::I16(array.as_primitive::<Int16Type>().value(i)),
        DataType::UInt16 => Cell::I32(i32::from(array.as_primitive::<UInt16Type>().value(i))),
        DataType::Int32 => Cell::I32(array.as_primitive::<Int32Type>().value(i)),
        DataType::UInt32 => Cell::I64(i64::from(array.as_primitive::<UInt32Type>().value(i))),
        DataType::Int64 => Cell::I64(array.as_primitive::<Int64Type>().value(i)),
        DataType::Float32 => Cell::F32(array.as_primitive::<Float32Type>().value(i)),
        DataType::Float64 => Cell::F64(array.as_primitive::<Float64Type>().value(i)),
        DataType::Utf8 => text(array.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => text(array.as_string::<i64>().value(i)),
        DataType::Utf8View => text(array.as_string_view().value(i)),
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            Cell::Micros(array.as_primitive::<TimestampMicrosecondType>().value(i))
        }
        DataType::Date32 => Cell::Days(array.as_primitive::<Date32Type>().value(i)),
        // `open` admits only the types above, and TableShape makes timestamps microseconds.
        _ => Cell::Null,
    }
}

/// Where a commit attempt ended.
enum Outcome {
    Committed,
    /// An earlier attempt had committed (its reply was lost): nothing more to do.
    Landed,
    /// Another process committed one of these partitions further: it owns them now.
    Overtaken(String),
}

/// A PostgreSQL table (see the module docs).
pub struct PostgresSink {
    name: String,
    /// `user@host:port/db table`, without the password, for messages.
    location: String,
    url: String,
    pipeline: String,
    rt: Arc<Runtime>,
    client: Option<Client>,
    /// The table, quoted (`"schema"."table"` or `"table"`).
    table: String,
    /// The offsets table, quoted, in the same schema.
    offsets: String,
    /// Column names, quoted, in stage order.
    columns: Vec<String>,
    types: Vec<Type>,
    mode: PostgresMode,
    /// Key columns, quoted.
    key: Vec<String>,
    shape: TableShape,
    /// Rows of the epoch being assembled: written only at commit, in its transaction.
    staged: Vec<RecordBatch>,
    last: Positions,
}

/// The table a sink writes, and the columns it wants there (name, type, type name, nullable).
struct Target {
    schema: Option<String>,
    table: String,
    wanted: Vec<(String, Type, &'static str, bool)>,
}

impl PostgresSink {
    /// Connects, creates the table from `shape` when missing (with `key` as its primary key for
    /// upserts) and the offsets table, and checks that an existing table fits.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        name: &str,
        url: &str,
        table: &str,
        mode: PostgresMode,
        key: &[String],
        pipeline: &str,
        shape: TableShape,
        rt: Arc<Runtime>,
    ) -> Result<Self, SinkError> {
        let (mut sink, target) =
            Self::unconnected(name, url, table, mode, key, pipeline, shape, rt)?;
        let mut client = sink.take_client()?;
        let prepared = sink.rt.block_on(sink.prepare(&mut client, &target, true));
        sink.client = Some(client);
        prepared?;
        Ok(sink)
    }

    /// How the stage's output fits the table, without creating or changing anything (for
    /// `flowgate validate`).
    pub fn check(
        name: &str,
        url: &str,
        table: &str,
        mode: PostgresMode,
        key: &[String],
        shape: TableShape,
        rt: Arc<Runtime>,
    ) -> Result<Fit, SinkError> {
        let (mut sink, target) = Self::unconnected(name, url, table, mode, key, "", shape, rt)?;
        let mut client = sink.take_client()?;
        sink.rt.block_on(sink.prepare(&mut client, &target, false))
    }

    /// The sink before it connects, and the table it writes.
    #[allow(clippy::too_many_arguments)]
    fn unconnected(
        name: &str,
        url: &str,
        table: &str,
        mode: PostgresMode,
        key: &[String],
        pipeline: &str,
        shape: TableShape,
        rt: Arc<Runtime>,
    ) -> Result<(Self, Target), SinkError> {
        let config_error = |message: String| SinkError::Config {
            sink: name.into(),
            message,
        };
        let schema = shape.schema().clone();
        let mut wanted = Vec::new();
        for field in schema.fields() {
            let Some((pg, udt)) = pg_type(field.data_type()) else {
                return Err(config_error(format!(
                    "column `{}` is {}, which the PostgreSQL sink cannot store (it stores booleans, integers, floats, strings, timestamps and dates)",
                    field.name(),
                    field.data_type()
                )));
            };
            wanted.push((field.name().clone(), pg, udt, field.is_nullable()));
        }
        for k in key {
            if !wanted.iter().any(|(n, ..)| n == k) {
                let names: Vec<&str> = wanted.iter().map(|(n, ..)| n.as_str()).collect();
                return Err(config_error(format!(
                    "`key`: no column `{k}` in the stage (columns: {})",
                    names.join(", ")
                )));
            }
        }
        let (schema_name, table_name) = match table.split_once('.') {
            Some((s, t)) => (Some(s.to_string()), t.to_string()),
            None => (None, table.to_string()),
        };
        let qualify = |t: &str| match &schema_name {
            Some(s) => format!("{}.{}", quote(s), quote(t)),
            None => quote(t),
        };
        let sink = PostgresSink {
            name: name.into(),
            location: format!("{} {table}", describe_url(url)),
            url: url.into(),
            pipeline: pipeline.into(),
            rt,
            client: None,
            table: qualify(&table_name),
            offsets: qualify(OFFSETS),
            columns: wanted.iter().map(|(n, ..)| quote(n)).collect(),
            types: wanted.iter().map(|(_, t, ..)| t.clone()).collect(),
            mode,
            key: key.iter().map(|k| quote(k)).collect(),
            shape,
            staged: Vec::new(),
            last: Positions::new(),
        };
        let target = Target {
            schema: schema_name,
            table: table_name,
            wanted,
        };
        Ok((sink, target))
    }

    fn fail(&self, message: impl std::fmt::Display) -> SinkError {
        SinkError::Table {
            sink: self.name.clone(),
            table: self.location.clone(),
            message: message.to_string(),
        }
    }

    /// The connection (made anew if there is none or it broke), taken out of `self` while in use.
    fn take_client(&mut self) -> Result<Client, SinkError> {
        if let Some(client) = self.client.take()
            && !client.is_closed()
        {
            return Ok(client);
        }
        let url = self.url.clone();
        let connected = self.rt.block_on(async {
            tokio::time::timeout(
                std::time::Duration::from_secs(30),
                tokio_postgres::connect(&url, NoTls),
            )
            .await
        });
        let (client, connection) = match connected {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return Err(self.fail(format!("cannot connect: {e}"))),
            Err(_) => return Err(self.fail("cannot connect: no answer within 30 s")),
        };
        let sink = self.name.clone();
        self.rt.spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(sink, "PostgreSQL connection closed: {e}");
            }
        });
        Ok(client)
    }

    /// Creates the tables that are missing; checks that an existing table has every stage column
    /// with the type the sink writes, and (for upserts) a unique index on exactly the key.
    async fn prepare(
        &self,
        client: &mut Client,
        target: &Target,
        create: bool,
    ) -> Result<Fit, SinkError> {
        let (schema, table, wanted) = (
            target.schema.as_deref(),
            target.table.as_str(),
            &target.wanted,
        );
        let fail = |what: &str, e: tokio_postgres::Error| self.fail(format!("{what}: {e}"));
        let found: Vec<(String, String)> = client
            .query(
                "SELECT column_name::text, udt_name::text FROM information_schema.columns \
                 WHERE table_schema = COALESCE($1, current_schema()) AND table_name = $2 \
                 ORDER BY ordinal_position",
                &[&schema, &table],
            )
            .await
            .map_err(|e| fail("reading the table's columns", e))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        if found.is_empty() && !create {
            return Ok(Fit::New);
        }
        if found.is_empty() {
            let mut defs: Vec<String> = wanted
                .iter()
                .map(|(n, _, udt, nullable)| {
                    let not_null = if *nullable { "" } else { " NOT NULL" };
                    format!("{} {udt}{not_null}", quote(n))
                })
                .collect();
            if self.mode == PostgresMode::Upsert {
                defs.push(format!("PRIMARY KEY ({})", self.key.join(", ")));
            }
            client
                .batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {} ({})",
                    self.table,
                    defs.join(", ")
                ))
                .await
                .map_err(|e| fail("creating the table", e))?;
            tracing::info!(sink = %self.name, table = %self.location, "created PostgreSQL table");
        } else {
            let mut problems = Vec::new();
            for (n, _, udt, _) in wanted {
                match found.iter().find(|(f, _)| f == n) {
                    None => problems.push(format!("no column `{n}` ({udt})")),
                    Some((_, have)) if have != udt && !(*udt == "text" && have == "varchar") => {
                        problems.push(format!("column `{n}` is {have}, the stage gives {udt}"))
                    }
                    _ => {}
                }
            }
            if self.mode == PostgresMode::Upsert {
                let indexes: Vec<Vec<String>> = client
                    .query(
                        "SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_index i \
                         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                         WHERE i.indrelid = $1::text::regclass AND i.indisunique GROUP BY i.indexrelid",
                        &[&self.table],
                    )
                    .await
                    .map_err(|e| fail("reading the table's unique indexes", e))?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let mut key: Vec<String> = self
                    .key
                    .iter()
                    .map(|k| k.trim_matches('"').replace("\"\"", "\""))
                    .collect();
                key.sort();
                if !indexes.contains(&key) {
                    problems.push(format!(
                        "`mode: upsert` needs a primary key or unique index on exactly ({}), and the table has none",
                        key.join(", ")
                    ));
                }
            }
            if !problems.is_empty() {
                return Err(SinkError::SchemaMismatch {
                    sink: self.name.clone(),
                    table: self.location.clone(),
                    message: problems.join("; "),
                });
            }
            if !create {
                return Ok(Fit::Same);
            }
        }
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {} (pipeline text NOT NULL, sink text NOT NULL, \
                 topic text NOT NULL, \"partition\" integer NOT NULL, \"offset\" bigint NOT NULL, \
                 epoch bigint NOT NULL, committed_at timestamptz NOT NULL DEFAULT now(), \
                 PRIMARY KEY (pipeline, sink, topic, \"partition\"))",
                self.offsets
            ))
            .await
            .map_err(|e| fail("creating the offsets table", e))?;
        Ok(Fit::Same)
    }

    /// One commit attempt: fence, rows, positions, all in one transaction.
    async fn try_commit(
        &self,
        client: &mut Client,
        positions: &Positions,
    ) -> Result<Outcome, tokio_postgres::Error> {
        let tx = client.transaction().await?;
        // Fencing: lock this commit's partitions' rows (made first, for a partition's first
        // commit; they go with the transaction unless replaced by the real position below). A
        // row recorded further than this process holds means another process took the
        // partition over.
        let topics: Vec<&str> = positions.keys().map(|(t, _)| t.as_str()).collect();
        let partitions: Vec<i32> = positions.keys().map(|(_, p)| *p).collect();
        tx.execute(
            &format!(
                "INSERT INTO {} (pipeline, sink, topic, \"partition\", \"offset\", epoch) \
                 SELECT $1, $2, t, p, -1, 0 FROM unnest($3::text[], $4::int4[]) AS u(t, p) \
                 ON CONFLICT DO NOTHING",
                self.offsets
            ),
            &[&self.pipeline, &self.name, &topics, &partitions],
        )
        .await?;
        let held = tx
            .query(
                &format!(
                    "SELECT topic, \"partition\", \"offset\", epoch FROM {} \
                     WHERE pipeline = $1 AND sink = $2 \
                     AND (topic, \"partition\") IN (SELECT * FROM unnest($3::text[], $4::int4[])) \
                     FOR UPDATE",
                    self.offsets
                ),
                &[&self.pipeline, &self.name, &topics, &partitions],
            )
            .await?;
        let mut table = Positions::new();
        for row in &held {
            let offset: i64 = row.get(2);
            if offset >= 0 {
                table.insert(
                    (row.get(0), row.get(1)),
                    Position {
                        offset,
                        epoch: u64::try_from(row.get::<_, i64>(3)).unwrap_or(0),
                    },
                );
            }
        }
        match fence(
            &format!("`{}`", self.offsets),
            positions,
            &table,
            &self.last,
        ) {
            Fence::Clear => {}
            Fence::Landed => return Ok(Outcome::Landed),
            Fence::Overtaken(why) => return Ok(Outcome::Overtaken(why)),
        }
        let rows: usize = self.staged.iter().map(RecordBatch::num_rows).sum();
        if rows > 0 {
            let upsert = self.mode == PostgresMode::Upsert;
            let target = if upsert {
                tx.batch_execute(&format!(
                    "CREATE TEMP TABLE IF NOT EXISTS {STAGE} (LIKE {} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS; \
                     ALTER TABLE {STAGE} ADD COLUMN IF NOT EXISTS flowgate_seq bigserial",
                    self.table
                ))
                .await?;
                STAGE.to_string()
            } else {
                self.table.clone()
            };
            let columns = self.columns.join(", ");
            let copy = tx
                .copy_in(&format!(
                    "COPY {target} ({columns}) FROM STDIN (FORMAT binary)"
                ))
                .await?;
            let mut writer = std::pin::pin!(BinaryCopyInWriter::new(copy, &self.types));
            let mut row: Vec<Cell<'_>> = Vec::with_capacity(self.columns.len());
            for batch in &self.staged {
                for i in 0..batch.num_rows() {
                    row.clear();
                    row.extend(batch.columns().iter().map(|c| cell(c.as_ref(), i)));
                    let values: Vec<&(dyn ToSql + Sync)> =
                        row.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
                    writer.as_mut().write(&values).await?;
                }
            }
            writer.as_mut().finish().await?;
            if upsert {
                let key = self.key.join(", ");
                let updates: Vec<String> = self
                    .columns
                    .iter()
                    .filter(|c| !self.key.contains(c))
                    .map(|c| format!("{c} = EXCLUDED.{c}"))
                    .collect();
                let on_conflict = if updates.is_empty() {
                    "DO NOTHING".to_string()
                } else {
                    format!("DO UPDATE SET {}", updates.join(", "))
                };
                // The last row of a key in the epoch wins.
                tx.batch_execute(&format!(
                    "INSERT INTO {} ({columns}) SELECT DISTINCT ON ({key}) {columns} FROM {STAGE} \
                     ORDER BY {key}, flowgate_seq DESC ON CONFLICT ({key}) {on_conflict}",
                    self.table
                ))
                .await?;
            }
        }
        let record = tx
            .prepare(&format!(
                "INSERT INTO {} (pipeline, sink, topic, \"partition\", \"offset\", epoch) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (pipeline, sink, topic, \"partition\") \
                 DO UPDATE SET \"offset\" = EXCLUDED.\"offset\", epoch = EXCLUDED.epoch, committed_at = now()",
                self.offsets
            ))
            .await?;
        for ((topic, partition), p) in positions {
            let epoch = i64::try_from(p.epoch).unwrap_or(i64::MAX);
            tx.execute(
                &record,
                &[
                    &self.pipeline,
                    &self.name,
                    topic,
                    partition,
                    &p.offset,
                    &epoch,
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Outcome::Committed)
    }

    /// The positions the offsets table records for this sink.
    async fn read_positions(&self, client: &Client) -> Result<Positions, tokio_postgres::Error> {
        let rows = client
            .query(
                &format!(
                    "SELECT topic, \"partition\", \"offset\", epoch FROM {} WHERE pipeline = $1 AND sink = $2",
                    self.offsets
                ),
                &[&self.pipeline, &self.name],
            )
            .await?;
        Ok(rows
            .iter()
            .filter(|r| r.get::<_, i64>(2) >= 0)
            .map(|r| {
                (
                    (r.get::<_, String>(0), r.get::<_, i32>(1)),
                    Position {
                        offset: r.get(2),
                        epoch: u64::try_from(r.get::<_, i64>(3)).unwrap_or(0),
                    },
                )
            })
            .collect())
    }
}

impl Sink for PostgresSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn write(&mut self, batch: RecordBatch) -> Result<(), SinkError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let batch = self
            .shape
            .apply(&batch)
            .map_err(|e| self.fail(format!("converting a batch: {e}")))?;
        self.staged.push(batch);
        Ok(())
    }

    fn commit(&mut self, positions: &Positions) -> Result<bool, SinkError> {
        if self.staged.is_empty() && !positions_moved(positions, &self.last) {
            return Ok(false);
        }
        let mut attempt = 0;
        loop {
            let mut client = self.take_client()?;
            let result = self.rt.block_on(self.try_commit(&mut client, positions));
            match result {
                Ok(Outcome::Committed | Outcome::Landed) => {
                    self.client = Some(client);
                    break;
                }
                Ok(Outcome::Overtaken(why)) => {
                    self.client = Some(client);
                    return Err(SinkError::Overtaken {
                        sink: self.name.clone(),
                        table: self.location.clone(),
                        message: why,
                    });
                }
                Err(e) => {
                    // The connection may have broken after the server committed: if the table
                    // records these positions, the commit landed and is not made twice.
                    let landed = self
                        .take_client()
                        .ok()
                        .and_then(|c| {
                            let held = self.rt.block_on(self.read_positions(&c)).ok();
                            self.client = Some(c);
                            held
                        })
                        .is_some_and(|held| {
                            positions_moved(positions, &self.last)
                                && positions.iter().all(|(k, p)| held.get(k) == Some(p))
                        });
                    if landed {
                        tracing::warn!(sink = %self.name, "PostgreSQL commit reported {e}, but its positions are in the table: not committing it again");
                        break;
                    }
                    attempt += 1;
                    if attempt > 3 {
                        return Err(self.fail(format!("commit failed: {e}")));
                    }
                    tracing::warn!(sink = %self.name, "PostgreSQL commit attempt {attempt} failed ({e}); retrying with the same rows");
                    std::thread::sleep(std::time::Duration::from_millis(200 * attempt));
                }
            }
        }
        self.staged.clear();
        self.last
            .extend(positions.iter().map(|(k, v)| (k.clone(), *v)));
        Ok(true)
    }

    fn committed(&mut self, topic: &str, partition: i32) -> Result<Option<Position>, SinkError> {
        let client = self.take_client()?;
        let held = self.rt.block_on(self.read_positions(&client));
        self.client = Some(client);
        let held = held.map_err(|e| self.fail(format!("reading the offsets table: {e}")))?;
        let key = (topic.to_string(), partition);
        let position = held.get(&key).copied();
        if let Some(p) = position {
            self.last.insert(key, p);
        }
        Ok(position)
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{
        BooleanArray, Date32Array, Float64Array, Int64Array, StringArray, TimestampMicrosecondArray,
    };
    use arrow::datatypes::{Field, Schema};

    use super::*;

    /// The PostgreSQL the tests write to (`FLOWGATE_TEST_POSTGRES`, default the machine's own).
    fn url() -> String {
        std::env::var("FLOWGATE_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    }

    /// A schema of its own for one test, dropped at the end.
    struct Scratch {
        rt: Arc<Runtime>,
        client: Client,
        schema: String,
    }

    impl Scratch {
        fn new(tag: &str) -> Self {
            let rt = Arc::new(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .unwrap(),
            );
            let (client, connection) = rt
                .block_on(tokio_postgres::connect(&url(), NoTls))
                .unwrap_or_else(|e| {
                    panic!("PostgreSQL at {} (FLOWGATE_TEST_POSTGRES): {e}", url())
                });
            rt.spawn(connection);
            let schema = format!("fg_{tag}_{}", std::process::id());
            rt.block_on(client.batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
            )))
            .unwrap();
            Scratch { rt, client, schema }
        }

        fn sql(&self, sql: &str) {
            self.rt.block_on(self.client.batch_execute(sql)).unwrap();
        }

        fn rows(&self, sql: &str) -> Vec<tokio_postgres::Row> {
            self.rt.block_on(self.client.query(sql, &[])).unwrap()
        }

        fn open(
            &self,
            table: &str,
            mode: PostgresMode,
            key: &[&str],
        ) -> Result<PostgresSink, SinkError> {
            let key: Vec<String> = key.iter().map(|k| k.to_string()).collect();
            let shape = TableShape::new("bars", &schema(), &[], None, None).unwrap();
            PostgresSink::open(
                "bars",
                &url(),
                &format!("{}.{table}", self.schema),
                mode,
                &key,
                "p",
                shape,
                self.rt.clone(),
            )
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = self.rt.block_on(
                self.client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema)),
            );
        }
    }

    fn schema() -> Arc<Schema> {
        let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        Arc::new(Schema::new(vec![
            Field::new("symbol", DataType::Utf8, false),
            Field::new("window_start", ts, false),
            Field::new("close", DataType::Float64, true),
            Field::new("trades", DataType::Int64, false),
            Field::new("day", DataType::Date32, false),
            Field::new("up", DataType::Boolean, true),
        ]))
    }

    fn bars(rows: &[(&str, i64, Option<f64>, i64)]) -> RecordBatch {
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.1))
                        .with_timezone("UTC"),
                ),
                Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.2))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.3))),
                Arc::new(Date32Array::from_iter_values(
                    rows.iter().map(|r| (r.1 / 86_400_000_000) as i32),
                )),
                Arc::new(BooleanArray::from_iter(
                    rows.iter().map(|r| r.2.map(|c| c > 100.0)),
                )),
            ],
        )
        .unwrap()
    }

    fn at(partition: i32, offset: i64, epoch: u64) -> Positions {
        [(("ticks".to_string(), partition), Position { offset, epoch })].into()
    }

    const T0: i64 = 1_762_957_800_123_456; // 2025-11-12T14:30:00.123456Z

    #[test]
    fn rows_and_positions_land_in_one_transaction_and_a_restart_reads_them() {
        let db = Scratch::new("append");
        let mut sink = db.open("bars", PostgresMode::Append, &[]).unwrap();
        sink.write(bars(&[("AAPL", T0, Some(101.5), 3), ("MSFT", T0, None, 1)]))
            .unwrap();
        let table = format!("{}.bars", db.schema);
        assert!(
            db.rows(&format!("SELECT * FROM {table}")).is_empty(),
            "nothing before the commit"
        );
        assert!(sink.commit(&at(0, 41, 2)).unwrap());
        let rows = db.rows(&format!(
            "SELECT symbol, (extract(epoch FROM window_start) * 1000000)::bigint, close, trades, day::text, up FROM {table} ORDER BY symbol"
        ));
        type Row = (String, i64, Option<f64>, i64, String, Option<bool>);
        let got: Vec<Row> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "AAPL".into(),
                    T0,
                    Some(101.5),
                    3,
                    "2025-11-12".into(),
                    Some(true)
                ),
                ("MSFT".into(), T0, None, 1, "2025-11-12".into(), None),
            ]
        );
        // Another process (a restart) reads the position the rows came with.
        let mut reopened = db.open("bars", PostgresMode::Append, &[]).unwrap();
        assert_eq!(
            reopened.committed("ticks", 0).unwrap(),
            Some(Position {
                offset: 41,
                epoch: 2
            })
        );
        assert_eq!(reopened.committed("ticks", 1).unwrap(), None);
    }

    #[test]
    fn an_upsert_replaces_the_row_with_the_same_key() {
        let db = Scratch::new("upsert");
        let mut sink = db
            .open("bars", PostgresMode::Upsert, &["symbol", "window_start"])
            .unwrap();
        sink.write(bars(&[
            ("AAPL", T0, Some(101.0), 3),
            ("AAPL", T0 + 60_000_000, Some(102.0), 1),
        ]))
        .unwrap();
        assert!(sink.commit(&at(0, 10, 1)).unwrap());
        // The same bar again (a later correction), twice within one epoch: the last one wins.
        sink.write(bars(&[
            ("AAPL", T0, Some(99.0), 4),
            ("AAPL", T0, Some(100.0), 5),
        ]))
        .unwrap();
        assert!(sink.commit(&at(0, 20, 2)).unwrap());
        let rows = db.rows(&format!(
            "SELECT close, trades FROM {}.bars ORDER BY window_start",
            db.schema
        ));
        let got: Vec<(f64, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(got, vec![(100.0, 5), (102.0, 1)]);
    }

    #[test]
    fn a_table_that_does_not_fit_is_refused_naming_the_difference() {
        let db = Scratch::new("misfit");
        db.sql(&format!(
            "CREATE TABLE {s}.typed (symbol text, window_start timestamptz, close text, trades bigint, day date, up boolean); \
             CREATE TABLE {s}.nokey (symbol text, window_start timestamptz, close float8, trades bigint, day date, up boolean)",
            s = db.schema
        ));
        let typed = db
            .open("typed", PostgresMode::Append, &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            typed.contains("column `close` is text, the stage gives float8"),
            "{typed}"
        );
        let nokey = db
            .open("nokey", PostgresMode::Upsert, &["symbol", "window_start"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            nokey.contains("needs a primary key or unique index on exactly (symbol, window_start)"),
            "{nokey}"
        );
        let unknown = db
            .open("bars", PostgresMode::Upsert, &["sym"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(unknown.contains("`key`: no column `sym`"), "{unknown}");
    }

    #[test]
    fn a_partition_another_process_committed_since_is_not_committed_again() {
        let db = Scratch::new("fence");
        let mut stalled = db.open("bars", PostgresMode::Append, &[]).unwrap();
        stalled.write(bars(&[("AAPL", T0, Some(1.0), 1)])).unwrap();
        assert!(stalled.commit(&at(0, 10, 1)).unwrap());
        assert!(stalled.commit(&at(1, 10, 1)).unwrap());
        let mut other = db.open("bars", PostgresMode::Append, &[]).unwrap();
        assert_eq!(
            other.committed("ticks", 0).unwrap(),
            Some(Position {
                offset: 10,
                epoch: 1
            })
        );
        other.write(bars(&[("MSFT", T0, Some(2.0), 1)])).unwrap();
        assert!(other.commit(&at(0, 20, 2)).unwrap());
        // The stalled process wakes up with rows of partition 0: refused, and nothing written.
        stalled
            .write(bars(&[("AAPL", T0 + 1, Some(3.0), 1)]))
            .unwrap();
        let refused = stalled
            .commit(&at(0, 15, 2))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            refused.contains("another process owns the partition"),
            "{refused}"
        );
        let count: i64 = db.rows(&format!("SELECT count(*) FROM {}.bars", db.schema))[0].get(0);
        assert_eq!(count, 2);
        assert_eq!(
            other.committed("ticks", 0).unwrap(),
            Some(Position {
                offset: 20,
                epoch: 2
            })
        );
    }
}
