// Unit-test helpers for JavaScript plugins, run under node (`node --test`): a step is created and
// called through the same exports, and the same Arrow IPC bytes, as the Flowgate host uses.

import {
    Bool,
    Binary,
    DateDay,
    Field,
    Float64,
    Int32,
    Int64,
    RecordBatch,
    RecordBatchReader,
    RecordBatchStreamWriter,
    Schema,
    Table,
    TimestampMicrosecond,
    Utf8,
    tableToIPC,
} from "apache-arrow";
import { Batch, PluginError, makeBatch } from "./flowgate.js";

export { makeBatch };

const TYPES = {
    utf8: () => new Utf8(),
    string: () => new Utf8(),
    float64: () => new Float64(),
    int64: () => new Int64(),
    int32: () => new Int32(),
    bool: () => new Bool(),
    boolean: () => new Bool(),
    binary: () => new Binary(),
    date: () => new DateDay(),
    // As the host decodes a pipeline's `timestamp` column: microseconds, UTC.
    timestamp: () => new TimestampMicrosecond("UTC"),
};

/** A schema from a pipeline-style map: `schemaOf({ symbol: "utf8", close: "float64", ts: "timestamp" })`. */
export function schemaOf(columns) {
    return new Schema(
        Object.entries(columns).map(([name, type]) => {
            const make = TYPES[type];
            if (!make) throw new Error(`schemaOf: unknown type \`${type}\` for \`${name}\``);
            return new Field(name, make(), true);
        }),
    );
}

function schemaBytes(schema) {
    const writer = new RecordBatchStreamWriter();
    writer.reset(undefined, schema);
    writer.close();
    return writer.toUint8Array(true);
}

function readBatches(bytes) {
    if (bytes.length === 0) return [];
    const reader = RecordBatchReader.from(bytes);
    reader.open();
    return [...reader].filter((b) => b.numRows > 0).map((b) => new Batch(b));
}

// The component's way of returning a WIT error (a thrown `{ payload }`) as a PluginError again.
function unwrap(f) {
    try {
        return f();
    } catch (e) {
        if (e && e.payload && typeof e.payload.tag === "string") {
            throw new PluginError(e.payload.tag, e.payload.val);
        }
        throw e;
    }
}

function decode(output) {
    return { batches: readBatches(output.batches), rejected: output.rejected };
}

/**
 * Creates a step of the plugin whose `transform` export is given, with `config` (an object, as
 * the pipeline's `config:` block) and the input `schema`, as the host would. Errors are thrown
 * as `PluginError`s (`e.tag` is `invalid-config`, `bad-input` or `internal`).
 */
export function instantiate(transform, config, schema) {
    const [transformer, outputSchema] = unwrap(() => transform.create(JSON.stringify(config ?? {}), schemaBytes(schema)));
    const declared = RecordBatchReader.from(outputSchema);
    declared.open();
    return {
        outputSchema: declared.schema,
        /** Processes a Batch (see `makeBatch`); returns `{ batches, rejected }`. */
        process(batch) {
            const rb = batch instanceof Batch ? batch.recordBatch : batch;
            const bytes = tableToIPC(new Table(rb.schema, [new RecordBatch(rb.schema, rb.data)]), "stream");
            return unwrap(() => decode(transformer.process(bytes)));
        },
        onWatermark(tsMs) {
            return unwrap(() => decode(transformer.onWatermark(BigInt(tsMs))));
        },
        snapshot() {
            return unwrap(() => transformer.snapshot());
        },
        restore(state) {
            return unwrap(() => transformer.restore(state));
        },
    };
}

/** The rows of batches as plain objects (64-bit integers and timestamps as BigInt). */
export function rows(batches) {
    const out = [];
    for (const batch of Array.isArray(batches) ? batches : [batches]) {
        const names = batch.schema.fields.map((f) => f.name);
        const columns = names.map((n) => batch.column(n));
        for (let i = 0; i < batch.numRows; i++) {
            const row = {};
            names.forEach((n, c) => {
                row[n] = columns[c].get(i);
            });
            out.push(row);
        }
    }
    return out;
}
