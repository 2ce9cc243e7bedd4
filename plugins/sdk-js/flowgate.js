// The Flowgate plugin SDK for JavaScript: the Rust SDK's shape over the `apache-arrow` package.
//
// A plugin module exports `transform = definePlugin({...})`; `build.mjs` bundles it with this
// file and makes it a WebAssembly component of the `flowgate:plugin` world, the contract the
// Rust plugins implement. The same module runs under node for unit tests (`testing.js`).
//
// Columns stay columnar and exact: numbers are typed arrays, 64-bit integers and timestamps
// `BigInt64Array`s (apache-arrow's `Vector.get` turns a µs timestamp into float milliseconds;
// this SDK never does).

import {
    RecordBatch,
    RecordBatchReader,
    RecordBatchStreamWriter,
    Schema,
    Struct,
    Table,
    Type,
    makeData,
    tableToIPC,
} from "apache-arrow";

// ---------------------------------------------------------------------------------------------
// Errors: the WIT contract's three variants.

/** An error the host acts on: `invalid-config`, `bad-input` or `internal` (see wit/flowgate.wit). */
export class PluginError extends Error {
    constructor(tag, message) {
        super(message);
        this.name = "PluginError";
        this.tag = tag;
    }
}

/** The step's `config:` (or its input schema) is wrong; `key` names it, as `rules.min`. */
export function invalidConfig(key, message) {
    return new PluginError("invalid-config", key ? `\`${key}\`: ${message}` : message);
}

/** A batch (or a restored state) cannot be processed as a whole. */
export function badInput(message) {
    return new PluginError("bad-input", message);
}

/** A bug or a broken invariant in the plugin: the host stops the step. */
export function internal(message) {
    return new PluginError("internal", message);
}

// ---------------------------------------------------------------------------------------------
// Logging: the host's `log` import inside WebAssembly, stderr under node.

const LEVELS = ["trace", "debug", "info", "warn", "error"];
let hostLog = null;

/** Wires the host's logger; the generated entry module calls it. */
export function setHostLog(fn) {
    hostLog = fn;
}

function write(level, message) {
    if (hostLog) {
        hostLog(level, String(message));
    } else if (LEVELS.indexOf(level) >= 2) {
        console.error(`[${level}] ${message}`);
    }
}

/** Log lines the host attributes to the calling step. */
export const log = Object.fromEntries(LEVELS.map((level) => [level, (m) => write(level, m)]));

// ---------------------------------------------------------------------------------------------
// Config: the step's `config:` block, with unknown keys refused.

function describe(value) {
    if (value === null) return "null";
    if (Array.isArray(value)) return "a list";
    if (typeof value === "object") return "a map";
    return `${typeof value} ${JSON.stringify(value)}`;
}

function checker(kind, test, extra = {}) {
    return { kind, test, ...extra };
}

/** Types for a config spec: `{ column: config.string(), min: config.number({ default: 0 }) }`. */
export const config = {
    string: (opts = {}) => checker("a string", (v) => typeof v === "string", opts),
    number: (opts = {}) => checker("a number", (v) => typeof v === "number" && Number.isFinite(v), opts),
    integer: (opts = {}) => checker("an integer", (v) => Number.isSafeInteger(v), opts),
    boolean: (opts = {}) => checker("true or false", (v) => typeof v === "boolean", opts),
    strings: (opts = {}) =>
        checker("a list of strings", (v) => Array.isArray(v) && v.every((s) => typeof s === "string"), opts),
    /** A nested map with its own spec. */
    map: (spec, opts = {}) => checker("a map", (v) => v !== null && typeof v === "object" && !Array.isArray(v), { ...opts, spec }),
};

/**
 * Parses the step's config (JSON text) against `spec`. Errors are `invalid-config` naming the
 * key (`min`, `rules.max`), in the words the Rust SDK uses, so the host points at its line.
 */
export function parseConfig(json, spec, prefix = "") {
    let value;
    if (typeof json === "string") {
        try {
            value = json.trim() === "" ? {} : JSON.parse(json);
        } catch (e) {
            throw invalidConfig("", `the config is not JSON: ${e.message}`);
        }
    } else {
        value = json;
    }
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
        throw invalidConfig(prefix.replace(/\.$/, ""), `expected a map, got ${describe(value)}`);
    }
    const keys = Object.keys(spec);
    for (const key of Object.keys(value)) {
        if (!Object.hasOwn(spec, key)) {
            const expected = keys.map((k) => `\`${k}\``).join(", ");
            throw invalidConfig(prefix.replace(/\.$/, ""), `unknown field \`${key}\`, expected one of ${expected}`);
        }
    }
    const out = {};
    for (const key of keys) {
        const want = spec[key];
        const path = prefix + key;
        if (!(key in value)) {
            if ("default" in want) {
                out[key] = want.default;
                continue;
            }
            throw invalidConfig(path, `missing field \`${key}\``);
        }
        const v = value[key];
        if (!want.test(v)) {
            throw invalidConfig(path, `expected ${want.kind}, got ${describe(v)}`);
        }
        out[key] = want.spec ? parseConfig(v, want.spec, `${path}.`) : v;
    }
    return out;
}

// ---------------------------------------------------------------------------------------------
// Columns.

const TYPE_NAMES = {
    [Type.Bool]: "bool",
    [Type.Int]: "int",
    [Type.Float]: "float",
    [Type.Utf8]: "utf8",
    [Type.Binary]: "binary",
    [Type.Timestamp]: "timestamp",
    [Type.Date]: "date",
};

const COLUMN_TYPES = {
    float64: (t) => t.typeId === Type.Float && t.precision === 2,
    float32: (t) => t.typeId === Type.Float && t.precision === 1,
    int64: (t) => t.typeId === Type.Int && t.bitWidth === 64 && t.isSigned,
    int32: (t) => t.typeId === Type.Int && t.bitWidth === 32 && t.isSigned,
    utf8: (t) => t.typeId === Type.Utf8,
    binary: (t) => t.typeId === Type.Binary,
    bool: (t) => t.typeId === Type.Bool,
    timestamp: (t) => t.typeId === Type.Timestamp && t.unit === 2,
    date: (t) => t.typeId === Type.Date,
};

/**
 * The index of column `name` in `schema`, checked to be of `type` (`float64`, `int64`, `utf8`,
 * `bool`, `timestamp` (µs), `date`, ...): for `create`, where a wrong column is the config's
 * fault. `key` is the config key that named it, for the error.
 */
export function requireColumn(schema, name, type, key) {
    const index = schema.fields.findIndex((f) => f.name === name);
    if (index < 0) {
        const names = schema.fields.map((f) => f.name).join(", ");
        throw invalidConfig(key, `the input has no column \`${name}\` (it has: ${names})`);
    }
    const test = COLUMN_TYPES[type];
    if (!test) throw internal(`requireColumn: \`${type}\` is not a type it knows`);
    if (!test(schema.fields[index].type)) {
        throw invalidConfig(key, `column \`${name}\` is ${typeLabel(schema.fields[index].type)}, expected ${type}`);
    }
    return index;
}

/** One column of a batch: typed `values` (sliced to the batch's rows), and its validity. */
export class Column {
    constructor(name, data) {
        this.name = name;
        this.data = data;
        this.type = data.type;
        this.length = data.length;
        /** Float64Array, BigInt64Array, Int32Array, ... (row i is `values[i]`); for utf8 and
         * binary the bytes, with `offsets`; for bool the bit-packed bytes (use `get`). */
        this.values = data.values;
        this.offsets = data.valueOffsets;
        this.hasNulls = data.nullCount > 0;
        this._bitmap = data.nullBitmap;
        this._offset = data.offset;
    }

    /** `null` when no row is null, else a Uint8Array with 1 for each row that has a value: for
     * a loop over every row, where calling `isValid` per row costs an interpreter more. */
    validity() {
        if (!this.hasNulls) return null;
        if (this._validity === undefined) {
            this._validity = unpackBits(this._bitmap, this._offset, this.length);
        }
        return this._validity;
    }

    /** False if row `i` is null. */
    isValid(i) {
        if (!this.hasNulls) return true;
        const bit = this._offset + i;
        return ((this._bitmap[bit >> 3] >> (bit & 7)) & 1) === 1;
    }

    /** Row `i` as a JavaScript value: a number, a BigInt for 64-bit integers and timestamps
     * (in the column's unit), a string, a Uint8Array, a boolean, or null. */
    get(i) {
        if (!this.isValid(i)) return null;
        switch (this.type.typeId) {
            case Type.Bool: {
                const bit = this._offset + i;
                return ((this.values[bit >> 3] >> (bit & 7)) & 1) === 1;
            }
            case Type.Utf8:
                return decoder.decode(this.values.subarray(this.offsets[i], this.offsets[i + 1]));
            case Type.Binary:
                return this.values.subarray(this.offsets[i], this.offsets[i + 1]);
            case Type.Date:
                return this.type.unit === 0 ? this.values[i] : this.values[i];
            default:
                return this.values[i];
        }
    }
}

const decoder = new TextDecoder();
const encoder = new TextEncoder();

function typeLabel(type) {
    return String(type);
}

/** A batch of rows: the input of `process`, or what a plugin builds. */
export class Batch {
    /** @param {RecordBatch} recordBatch */
    constructor(recordBatch) {
        this.recordBatch = recordBatch;
        this.schema = recordBatch.schema;
        this.numRows = recordBatch.numRows;
    }

    /** The column named `name` (an `invalid-config` error if there is none). */
    column(name) {
        const index = this.schema.fields.findIndex((f) => f.name === name);
        if (index < 0) {
            const names = this.schema.fields.map((f) => f.name).join(", ");
            throw invalidConfig("", `the input has no column \`${name}\` (it has: ${names})`);
        }
        return new Column(name, this.recordBatch.data.children[index]);
    }

    _typed(name, test, want) {
        const column = this.column(name);
        if (!test(column.type)) {
            throw invalidConfig("", `column \`${name}\` is ${typeLabel(column.type)}, expected ${want}`);
        }
        return column;
    }

    /** A float64 column: `values` is a Float64Array. */
    float64(name) {
        return this._typed(name, (t) => t.typeId === Type.Float && t.precision === 2, "float64");
    }

    /** An int64 column: `values` is a BigInt64Array. */
    int64(name) {
        return this._typed(name, (t) => t.typeId === Type.Int && t.bitWidth === 64 && t.isSigned, "int64");
    }

    /** A timestamp column in microseconds: `values` is a BigInt64Array of µs since the epoch. */
    timestampMicros(name) {
        return this._typed(name, (t) => t.typeId === Type.Timestamp && t.unit === 2, "timestamp (µs)");
    }

    /** A utf8 column: `get(i)` is a string; `values`/`offsets` the raw bytes. */
    utf8(name) {
        return this._typed(name, (t) => t.typeId === Type.Utf8, "utf8");
    }

    /** The rows whose `keep[i]` is truthy (a Uint8Array or any array of booleans), in order. */
    filter(keep) {
        // Runs of consecutive kept rows: each column is then copied a run at a time (one
        // `TypedArray.set` per run), not a row at a time, which is what an interpreter pays for.
        const n = this.numRows;
        if (keep.length !== n) {
            throw internal(`filter: the mask has ${keep.length} entries for ${n} rows`);
        }
        const starts = new Int32Array((n >> 1) + 1);
        const ends = new Int32Array((n >> 1) + 1);
        let runs = 0;
        let kept = 0;
        if (keep instanceof Uint8Array) {
            // The runs lie between the zeros, which the engine finds natively (`indexOf`): the
            // interpreter steps once per dropped row, not once per row.
            let from = 0;
            while (from < n) {
                let zero = keep.indexOf(0, from);
                if (zero < 0) zero = n;
                if (zero > from) {
                    starts[runs] = from;
                    ends[runs] = zero;
                    kept += zero - from;
                    runs++;
                }
                from = zero + 1;
            }
        } else {
            let open = false;
            for (let i = 0; i < n; i++) {
                if (keep[i]) {
                    if (!open) {
                        starts[runs] = i;
                        open = true;
                    }
                } else if (open) {
                    ends[runs] = i;
                    kept += i - starts[runs];
                    runs++;
                    open = false;
                }
            }
            if (open) {
                ends[runs] = n;
                kept += n - starts[runs];
                runs++;
            }
        }
        if (kept === n) return this;
        if (kept === 0) return this.take(new Int32Array(0));
        const fields = this.schema.fields;
        const pick = runsPicker(starts, ends, runs, kept);
        const children = this.recordBatch.data.children.map((data, c) => pickColumn(data, fields[c], kept, pick));
        return this._derived(children, kept);
    }

    /** The rows at `rows` (an Int32Array of row numbers), in that order. */
    take(rows) {
        const fields = this.schema.fields;
        const pick = rowsPicker(rows);
        const children = this.recordBatch.data.children.map((data, c) => pickColumn(data, fields[c], rows.length, pick));
        return this._derived(children, rows.length);
    }

    _derived(children, length) {
        const struct = makeData({ type: new Struct(this.schema.fields), length, nullCount: 0, children });
        return new Batch(new RecordBatch(this.schema, struct));
    }
}

function unsupported(field, type) {
    return internal(
        `the JavaScript SDK cannot copy rows of column \`${field.name}\` (${typeLabel(type)}): ` +
            "it handles ints, floats, bool, utf8, binary, timestamps and dates",
    );
}

// Bitmaps a byte at a time: the interpreter steps once per 8 rows, and typed-array copies (which
// run natively) do the rest.

// BYTE_BITS[b] is byte b's 8 bits as 8 bytes of 0/1, lowest bit first.
const BYTE_BITS = new Uint8Array(256 * 8);
for (let b = 0; b < 256; b++) for (let k = 0; k < 8; k++) BYTE_BITS[b * 8 + k] = (b >> k) & 1;

// Bits `offset`..`offset + n` of `bitmap` as n bytes of 0/1. The table sits behind the output in
// one buffer, so each byte is one `copyWithin` (a native move, no array allocated).
function unpackBits(bitmap, offset, n) {
    const first = offset >> 3;
    const shift = offset & 7;
    const bytes = (shift + n + 7) >> 3;
    const table = bytes * 8;
    const out = new Uint8Array(table + BYTE_BITS.length);
    out.set(BYTE_BITS, table);
    for (let k = 0; k < bytes; k++) {
        const from = table + bitmap[first + k] * 8;
        out.copyWithin(k * 8, from, from + 8);
    }
    return out.subarray(shift, shift + n);
}

// n bytes of 0/1 (`flags`, whose buffer holds a multiple of 8 bytes from its start) packed into a
// bitmap, lowest bit first: four flags are one 32-bit word, and one multiplication gathers their
// low bits into the top nibble (0x10204080 moves byte i's bit to bit 28 + i, no two products
// overlapping); and how many flags were 0.
function packBits(flags, n) {
    const out = new Uint8Array((n + 7) >> 3);
    const words = new Uint32Array(flags.buffer, flags.byteOffset, out.length * 2);
    for (let k = 0; k < out.length; k++) {
        out[k] = (Math.imul(words[2 * k], 0x10204080) >>> 28) | ((Math.imul(words[2 * k + 1], 0x10204080) >>> 28) << 4);
    }
    let ones = 0;
    for (let k = 0; k < out.length; k++) ones += POPCOUNT[out[k]];
    return [out, n - ones];
}

const POPCOUNT = new Uint8Array(256);
for (let b = 1; b < 256; b++) POPCOUNT[b] = (b & 1) + POPCOUNT[b >> 1];

// Bit `offset + row` of `bitmap` for each kept row, packed from bit 0; and how many were 0.
function copyBits(bitmap, offset, starts, ends, runs, kept) {
    const n = ends[runs - 1];
    // The kept flags moved to the front, in place, then copied to a buffer of whole words (zero
    // past the last), as packBits reads them.
    const flags = unpackBits(bitmap, offset, n);
    const at = compactRuns(flags, starts, ends, runs);
    const picked = new Uint8Array(((kept + 7) >> 3) * 8);
    picked.set(flags.subarray(0, at));
    return packBits(picked, kept);
}

// Moves each run [starts[r], ends[r]) of `array` to follow the one before it, from index 0, in
// place (`copyWithin`: a native move, nothing allocated); returns where the last one ends.
function compactRuns(array, starts, ends, runs) {
    let at = 0;
    for (let r = 0; r < runs; r++) {
        if (starts[r] !== at) array.copyWithin(at, starts[r], ends[r]);
        at += ends[r] - starts[r];
    }
    return at;
}

// The column types whose values are one fixed-width typed array (the IPC writer's too).
const FIXED_WIDTH = new Set([Type.Int, Type.Float, Type.Timestamp, Type.Date, Type.Time, Type.Duration]);

// One column's picked rows (`length` of them): its null bitmap and its values, each moved the
// picker's way (`bits`, `fixed`, `bytes`; see `runsPicker` and `rowsPicker`), by kind of data.
function pickColumn(data, field, length, pick) {
    const type = data.type;
    const id = type.typeId;
    let nullBitmap;
    let nullCount = 0;
    if (data.nullCount > 0) [nullBitmap, nullCount] = pick.bits(data.nullBitmap, data.offset);
    const made = { type, length, nullCount, nullBitmap };
    // Fixed-width `values` are already sliced to the batch's rows.
    if (FIXED_WIDTH.has(id)) return makeData({ ...made, data: pick.fixed(data.values) });
    if (id === Type.Bool) return makeData({ ...made, data: pick.bits(data.values, data.offset)[0] });
    if (id === Type.Utf8 || id === Type.Binary) {
        const [valueOffsets, bytes] = pick.bytes(data.valueOffsets, data.values);
        return makeData({ ...made, valueOffsets, data: bytes });
    }
    throw unsupported(field, type);
}

// Filter's picker: the runs [starts[r], ends[r]) of kept rows, `kept` rows in all.
function runsPicker(starts, ends, runs, kept) {
    return {
        bits: (bitmap, offset) => copyBits(bitmap, offset, starts, ends, runs, kept),
        fixed(values) {
            const out = values.slice(0, ends[runs - 1]);
            compactRuns(out, starts, ends, runs);
            return out.subarray(0, kept);
        },
        bytes(offsets, values) {
            const base = offsets[0];
            const out = values.slice(base, offsets[ends[runs - 1]]);
            const outOffsets = new Int32Array(kept + 1);
            let j = 0;
            let at = 0;
            for (let r = 0; r < runs; r++) {
                const first = offsets[starts[r]];
                const last = offsets[ends[r]];
                if (first - base !== at) out.copyWithin(at, first - base, last - base);
                const shift = at - first;
                for (let i = starts[r]; i < ends[r]; i++) outOffsets[++j] = offsets[i + 1] + shift;
                at += last - first;
            }
            return [outOffsets, out.subarray(0, at)];
        },
    };
}

function takeBitmap(bitmap, offset, rows) {
    const out = new Uint8Array((rows.length + 7) >> 3);
    let nulls = 0;
    for (let j = 0; j < rows.length; j++) {
        const bit = offset + rows[j];
        if ((bitmap[bit >> 3] >> (bit & 7)) & 1) out[j >> 3] |= 1 << (j & 7);
        else nulls++;
    }
    return [out, nulls];
}

// A 64-bit typed array as 32-bit halves: copying those moves no BigInt (or NaN payload) through
// the interpreter.
function words(values) {
    return values.BYTES_PER_ELEMENT === 8 ? new Int32Array(values.buffer, values.byteOffset, values.length * 2) : null;
}

// Take's picker: the rows at `rows`, in that order.
function rowsPicker(rows) {
    const length = rows.length;
    return {
        bits: (bitmap, offset) => takeBitmap(bitmap, offset, rows),
        fixed(values) {
            const out = new values.constructor(length);
            const from = words(values);
            if (from) {
                const to = words(out);
                for (let j = 0; j < length; j++) {
                    const r = rows[j] << 1;
                    to[j << 1] = from[r];
                    to[(j << 1) + 1] = from[r + 1];
                }
            } else {
                for (let j = 0; j < length; j++) out[j] = values[rows[j]];
            }
            return out;
        },
        bytes(offsets, values) {
            const outOffsets = new Int32Array(length + 1);
            let size = 0;
            for (let j = 0; j < length; j++) {
                const r = rows[j];
                size += offsets[r + 1] - offsets[r];
                outOffsets[j + 1] = size;
            }
            const out = new Uint8Array(size);
            for (let j = 0; j < length; j++) {
                const r = rows[j];
                out.set(values.subarray(offsets[r], offsets[r + 1]), outOffsets[j]);
            }
            return [outOffsets, out];
        },
    };
}

// ---------------------------------------------------------------------------------------------
// Building batches.

/**
 * A batch of `schema` from columns given as typed arrays, plain arrays (null for a missing
 * value) or `Column`s of another batch (taken as they are):
 * `makeBatch(schema, { symbol: ["A", "B"], close: Float64Array.of(1, 2) })`.
 */
export function makeBatch(schema, columns) {
    const fields = schema.fields;
    let length = -1;
    const children = fields.map((field) => {
        const values = columns[field.name];
        if (values === undefined) throw internal(`makeBatch: no values for column \`${field.name}\``);
        if (length >= 0 && values.length !== length) {
            throw internal(`makeBatch: column \`${field.name}\` has ${values.length} values, the others ${length}`);
        }
        length = values.length;
        return columnData(field, values);
    });
    const struct = makeData({ type: new Struct(fields), length: Math.max(length, 0), nullCount: 0, children });
    return new Batch(new RecordBatch(schema, struct));
}

function validity(values) {
    let nulls = 0;
    const bitmap = new Uint8Array((values.length + 7) >> 3);
    for (let i = 0; i < values.length; i++) {
        if (values[i] === null || values[i] === undefined) nulls++;
        else bitmap[i >> 3] |= 1 << (i & 7);
    }
    return nulls > 0 ? [bitmap, nulls] : [undefined, 0];
}

function columnData(field, values) {
    const type = field.type;
    if (values instanceof Column) {
        // A column of another batch, as it is (no copy).
        if (values.type.compareTo ? !values.type.compareTo(type) : String(values.type) !== String(type)) {
            throw internal(`makeBatch: column \`${field.name}\` is ${typeLabel(type)}, given ${typeLabel(values.type)}`);
        }
        return values.data;
    }
    const length = values.length;
    const typed = ArrayBuffer.isView(values);
    const [nullBitmap, nullCount] = typed ? [undefined, 0] : validity(values);
    switch (type.typeId) {
        case Type.Int:
        case Type.Float:
        case Type.Timestamp:
        case Type.Date: {
            const ArrayType = type.ArrayType;
            if (typed && values instanceof ArrayType) {
                return makeData({ type, length, data: values });
            }
            const out = new ArrayType(length);
            const big = out instanceof BigInt64Array || out instanceof BigUint64Array;
            for (let i = 0; i < length; i++) {
                const v = values[i];
                if (v === null || v === undefined) continue;
                out[i] = big ? BigInt(v) : Number(v);
            }
            return makeData({ type, length, nullCount, nullBitmap, data: out });
        }
        case Type.Bool: {
            const out = new Uint8Array((length + 7) >> 3);
            for (let i = 0; i < length; i++) if (values[i]) out[i >> 3] |= 1 << (i & 7);
            return makeData({ type, length, nullCount, nullBitmap, data: out });
        }
        case Type.Utf8:
        case Type.Binary: {
            const parts = [];
            const offsets = new Int32Array(length + 1);
            let size = 0;
            for (let i = 0; i < length; i++) {
                const v = values[i];
                const bytes = v === null || v === undefined ? new Uint8Array(0) : typeof v === "string" ? encoder.encode(v) : v;
                parts.push(bytes);
                size += bytes.length;
                offsets[i + 1] = size;
            }
            const out = new Uint8Array(size);
            for (let i = 0; i < length; i++) out.set(parts[i], offsets[i]);
            return makeData({ type, length, nullCount, nullBitmap, valueOffsets: offsets, data: out });
        }
        default:
            throw internal(`makeBatch: column \`${field.name}\` has a type the SDK cannot build (${typeLabel(type)})`);
    }
}

// ---------------------------------------------------------------------------------------------
// Output.

/** What a call produced: batches, and input rows refused with a reason (the dead letter). */
export class Output {
    constructor() {
        this.batches = [];
        this.rejected = [];
    }

    /** Adds a batch with the plugin's declared output schema. */
    push(batch) {
        if (batch && batch.numRows > 0) this.batches.push(batch);
        return this;
    }

    /**
     * Refuses input row `row` (its index in the batch given to `process`). The row also leaves
     * every output batch made of the input's own rows, so it is never in both the output and the
     * dead letter: the input itself, or a batch with as many rows sharing one of its columns (the
     * input with a computed column added). A batch the plugin filtered or built is left as it is:
     * leave the rejected rows out of it yourself (as the scaffold's `keep` mask does).
     */
    reject(row, reason) {
        this.rejected.push({ row, reason: String(reason) });
        return this;
    }

    get numRows() {
        return this.batches.reduce((n, b) => n + b.numRows, 0);
    }
}

function settle(output, input) {
    if (output.rejected.length === 0) return output;
    const rows = input.numRows;
    for (const r of output.rejected) {
        if (!Number.isInteger(r.row) || r.row < 0 || r.row >= rows) {
            throw internal(
                `rejected row ${r.row} of a batch of ${rows} rows (rows count from 0 in the batch given to \`process\`)`,
            );
        }
    }
    const keep = new Uint8Array(rows).fill(1);
    for (const r of output.rejected) keep[r.row] = 0;
    // A batch made of the input's own rows: as many rows, and one of its columns (the input
    // itself, or the input with a computed column added), as the Rust SDK decides.
    const columns = new Set(input.recordBatch.data.children);
    const aligned = (batch) =>
        batch === input ||
        (batch instanceof Batch && batch.numRows === rows && batch.recordBatch.data.children.some((c) => columns.has(c)));
    output.batches = output.batches
        .map((batch) => {
            return aligned(batch) ? batch.filter(keep) : batch;
        })
        .filter((b) => b.numRows > 0);
    return output;
}

// ---------------------------------------------------------------------------------------------
// IPC at the boundary.

function readStream(bytes) {
    const reader = RecordBatchReader.from(bytes);
    reader.open();
    // Read before the batches: a reader that reached its end forgets its schema.
    const schema = reader.schema;
    const batches = [];
    for (const batch of reader) {
        if (batch.numRows > 0) batches.push(batch);
    }
    return { schema, batches };
}

function schemaBytes(schema) {
    const writer = new RecordBatchStreamWriter();
    writer.reset(undefined, schema);
    writer.close();
    return writer.toUint8Array(true);
}

function encodeOutput(output, schema) {
    const rejected = output.rejected.map((r) => ({ row: r.row, reason: r.reason }));
    if (output.batches.length === 0) return { batches: new Uint8Array(0), rejected };
    const batches = output.batches.map((b) => {
        const rb = b instanceof Batch ? b.recordBatch : b;
        // Re-labelled with the declared schema (names, nullability, metadata).
        return rb.schema === schema ? rb : new RecordBatch(schema, rb.data);
    });
    const fast = writeFlatStream(schema, batches);
    return { batches: fast ?? tableToIPC(new Table(schema, batches), "stream"), rejected };
}

// The IPC stream of flat batches, written here: the schema message once per schema (from
// apache-arrow), then per batch a RecordBatch message built by hand and its buffers copied
// natively. apache-arrow's own writer costs an interpreter several times as much. Returns null
// for what it does not write (nested or dictionary columns, a column with an offset or offsets
// not from 0), which apache-arrow's writer then does.
const schemaMessages = new WeakMap();

function schemaMessage(schema) {
    let bytes = schemaMessages.get(schema);
    if (bytes === undefined) {
        const stream = schemaBytes(schema);
        bytes = stream.subarray(0, stream.length - 8); // without the end-of-stream marker
        schemaMessages.set(schema, bytes);
    }
    return bytes;
}

// The buffers of one column as the IPC format lists them, or null when this writer leaves it.
function columnBuffers(data) {
    if (data.offset !== 0 || data.dictionary) return null;
    const n = data.length;
    const validity = data.nullCount > 0 ? data.nullBitmap.subarray(0, (n + 7) >> 3) : new Uint8Array(0);
    const id = data.type.typeId;
    const bytes = (a, count) => new Uint8Array(a.buffer, a.byteOffset, count * a.BYTES_PER_ELEMENT);
    if (FIXED_WIDTH.has(id)) {
        const values = data.values;
        const width = values.BYTES_PER_ELEMENT * (data.stride || 1);
        return [validity, new Uint8Array(values.buffer, values.byteOffset, n * width)];
    }
    if (id === Type.Bool) return [validity, data.values.subarray(0, (n + 7) >> 3)];
    if (id === Type.Utf8 || id === Type.Binary) {
        const offsets = data.valueOffsets;
        if (offsets[0] !== 0) return null;
        return [validity, bytes(offsets, n + 1), data.values.subarray(0, offsets[n])];
    }
    return null;
}

const pad8 = (n) => (n + 7) & ~7;

// A RecordBatch message (its flatbuffer) for `rows` rows, the columns' (length, nulls) `nodes`
// and the body's (offset, length) `buffers`; `body` bytes follow it. Layout, offsets from the
// flatbuffer's start, every 64-bit field 8-aligned: the root offset; Message's vtable and table
// (header, bodyLength, version V5, header type RecordBatch); RecordBatch's vtable and table
// (length, nodes, buffers); the nodes vector; the buffers vector.
function batchMessage(rows, nodes, buffers, body) {
    const nodesAt = 80; // vector length at 76
    const buffersAt = nodesAt + 16 * nodes.length + 8; // length 4 bytes before
    const size = pad8(buffersAt + 16 * buffers.length);
    const out = new Uint8Array(8 + size);
    const v = new DataView(out.buffer);
    v.setUint32(0, 0xffffffff, true);
    v.setInt32(4, size, true);
    const at = 8; // the flatbuffer's start in `out`
    const u16 = (o, x) => v.setUint16(at + o, x, true);
    const u32 = (o, x) => v.setUint32(at + o, x, true);
    const i64 = (o, x) => v.setBigInt64(at + o, BigInt(x), true);
    u32(0, 16); // root: the Message table
    // Message vtable at 4: 4 fields (version, header_type, header, bodyLength).
    u16(4, 12);
    u16(6, 20);
    u16(8, 16); // version
    u16(10, 18); // header_type
    u16(12, 4); // header
    u16(14, 8); // bodyLength
    // Message table at 16.
    v.setInt32(at + 16, 16 - 4, true);
    u32(20, 52 - 20); // header: the RecordBatch table
    i64(24, body);
    v.setInt16(at + 32, 4, true); // MetadataVersion V5
    out[at + 34] = 3; // MessageHeader.RecordBatch
    // RecordBatch vtable at 40: 3 fields (length, nodes, buffers).
    u16(40, 10);
    u16(42, 20);
    u16(44, 4);
    u16(46, 12);
    u16(48, 16);
    // RecordBatch table at 52.
    v.setInt32(at + 52, 52 - 40, true);
    i64(56, rows);
    u32(64, nodesAt - 4 - 64);
    u32(68, buffersAt - 4 - 68);
    u32(nodesAt - 4, nodes.length);
    nodes.forEach(([length, nulls], k) => {
        i64(nodesAt + 16 * k, length);
        i64(nodesAt + 16 * k + 8, nulls);
    });
    u32(buffersAt - 4, buffers.length);
    buffers.forEach(([offset, length], k) => {
        i64(buffersAt + 16 * k, offset);
        i64(buffersAt + 16 * k + 8, length);
    });
    return out;
}

export function _writeFlatStream(schema, batches) {
    return writeFlatStream(schema, batches);
}

function writeFlatStream(schema, batches) {
    const parts = [schemaMessage(schema)];
    for (const rb of batches) {
        const nodes = [];
        const buffers = [];
        const pieces = [];
        let body = 0;
        for (const data of rb.data.children) {
            const own = columnBuffers(data);
            if (own === null) return null;
            nodes.push([data.length, data.nullCount]);
            for (const b of own) {
                buffers.push([body, b.length]);
                pieces.push([body, b]);
                body += pad8(b.length);
            }
        }
        parts.push(batchMessage(rb.numRows, nodes, buffers, body));
        const bytes = new Uint8Array(body);
        for (const [offset, b] of pieces) bytes.set(b, offset);
        parts.push(bytes);
    }
    parts.push(Uint8Array.of(0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0));
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
        out.set(p, at);
        at += p.length;
    }
    return out;
}

// ---------------------------------------------------------------------------------------------
// The plugin: what the component exports.

// State bytes as every Flowgate SDK frames them: `FGS1`, the state version (u32, little
// endian), then the plugin's own bytes; so a state moves between the Rust and JavaScript builds of
// a plugin (a live swap) when their bytes agree, and is refused by version when they do not.
const STATE_MAGIC = [0x46, 0x47, 0x53, 0x31];

function frame(version, body) {
    const out = new Uint8Array(8 + body.length);
    out.set(STATE_MAGIC, 0);
    new DataView(out.buffer).setUint32(4, version, true);
    out.set(body, 8);
    return out;
}

function unframe(name, bytes) {
    if (bytes.length < 8) {
        throw badInput(`\`${name}\`: snapshot is ${bytes.length} bytes, too short for its header`);
    }
    for (let i = 0; i < 4; i++) {
        if (bytes[i] !== STATE_MAGIC[i]) throw badInput(`\`${name}\`: these bytes are not a Flowgate snapshot`);
    }
    const version = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getUint32(4, true);
    return [version, bytes.subarray(8)];
}

/** A WIT error for a thrown value: the SDK's own errors keep their variant; anything else is
 * re-thrown, so the guest traps and the host bisects the batch for the poison row (as for a
 * Rust panic) and reports what was printed. */
function toWit(e) {
    if (e instanceof PluginError) {
        // componentize-js: a thrown object with `payload` is the `err` of a `result`.
        return { payload: { tag: e.tag, val: e.message } };
    }
    // SpiderMonkey's `stack` holds only the frames: the message first, then where.
    const text = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
    console.error(`Uncaught ${text}${e && e.stack ? `\n${e.stack}` : ""}`);
    // Inside WebAssembly any value without a `payload` traps the call; a short one keeps
    // componentize-js from printing the message a second time. Under node the exception itself
    // goes on, for the test that called.
    return hostLog ? "the exception printed above ended the call" : e;
}

function guard(f) {
    try {
        return f();
    } catch (e) {
        throw toWit(e);
    }
}

/**
 * Defines a plugin. `definition`:
 * - `name`, `version` (default "0.1.0"), `stateVersion` (default 0: stateless);
 * - `config`: a spec for `parseConfig` (unknown keys are refused);
 * - `create(config, inputSchema)`: returns `{ step, schema }`, the step object and the
 *   output schema (an apache-arrow `Schema`; `inputSchema` itself to keep the columns);
 * the step object has `process(batch) -> Output` and may have `onWatermark(tsMs) -> Output`,
 * `snapshot() -> Uint8Array` and `restore(version, bytes)` (the SDK frames the bytes with the
 * state version, as the Rust SDK does; `restore` gets the version they were written at).
 *
 * Returns the `transform` export of the `flowgate:plugin` world.
 */
export function definePlugin(definition) {
    const info = {
        name: definition.name,
        version: definition.version ?? "0.1.0",
        stateVersion: definition.stateVersion ?? 0,
    };
    if (typeof info.name !== "string" || typeof definition.create !== "function") {
        throw new Error("definePlugin needs a `name` and a `create` function");
    }

    class Transformer {
        constructor(step, schema) {
            this.step = step;
            this.schema = schema;
        }

        process(bytes) {
            return guard(() => {
                const { batches } = readStream(bytes);
                const output = new Output();
                const rejected = [];
                let base = 0;
                for (const rb of batches) {
                    const input = new Batch(rb);
                    const out = this.step.process(input);
                    if (!(out instanceof Output)) {
                        throw internal("`process` must return an Output");
                    }
                    settle(out, input);
                    output.batches.push(...out.batches);
                    for (const r of out.rejected) rejected.push({ row: r.row + base, reason: r.reason });
                    base += rb.numRows;
                }
                output.rejected = rejected;
                return encodeOutput(output, this.schema);
            });
        }

        onWatermark(tsMs) {
            return guard(() => {
                const out = this.step.onWatermark ? this.step.onWatermark(Number(tsMs)) : new Output();
                if (!(out instanceof Output)) throw internal("`onWatermark` must return an Output");
                if (out.rejected.length > 0) throw internal("`onWatermark` has no input rows to reject");
                return encodeOutput(out, this.schema);
            });
        }

        snapshot() {
            return guard(() => {
                const body = this.step.snapshot ? this.step.snapshot() : new Uint8Array(0);
                if (!(body instanceof Uint8Array)) throw internal("`snapshot` must return a Uint8Array");
                return frame(info.stateVersion, body);
            });
        }

        restore(state) {
            return guard(() => {
                const [version, body] = unframe(info.name, state);
                if (this.step.restore) {
                    this.step.restore(version, body);
                } else if (version !== info.stateVersion) {
                    throw badInput(`\`${info.name}\` reads state version ${info.stateVersion}, got ${version}`);
                } else if (body.length > 0) {
                    throw badInput(`\`${info.name}\` keeps no state but was given ${body.length} bytes`);
                }
            });
        }
    }

    return {
        info() {
            return { ...info };
        },
        create(configJson, inputSchemaBytes) {
            return guard(() => {
                const inputSchema = readStream(inputSchemaBytes).schema;
                const parsed = definition.config ? parseConfig(configJson, definition.config) : JSON.parse(configJson || "{}");
                const made = definition.create(parsed, inputSchema);
                if (!made || !made.step || !(made.schema instanceof Schema)) {
                    throw internal("`create` must return { step, schema } with an apache-arrow Schema");
                }
                return [new Transformer(made.step, made.schema), schemaBytes(made.schema)];
            });
        },
        Transformer,
    };
}

// The Arrow types a plugin declares its output with.
export {
    Binary,
    Bool,
    DateDay,
    Field,
    Float32,
    Float64,
    Int32,
    Int64,
    Schema,
    TimestampMicrosecond,
    Utf8,
} from "apache-arrow";
