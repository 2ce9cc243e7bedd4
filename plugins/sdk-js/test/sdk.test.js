// The JavaScript SDK under node: config, columns, filter/take on every type it claims (nulls,
// slices with offsets), rejected rows, state framing, and the errors a plugin author meets.
import assert from "node:assert/strict";
import { test } from "node:test";

import { Bool, DateDay, Field, Float64, Int32, Int64, RecordBatchReader, Schema, TimestampMicrosecond, Utf8, Binary } from "apache-arrow";

import { Batch, Output, PluginError, _writeFlatStream, config, definePlugin, makeBatch, parseConfig, requireColumn } from "../flowgate.js";
import { instantiate, rows, schemaOf } from "../testing.js";

test("config: keys are checked, defaults filled, unknown keys refused by name", () => {
    const spec = { column: config.string(), min: config.number({ default: 0 }), rules: config.map({ max: config.integer() }) };
    assert.deepEqual(parseConfig('{"column":"price","rules":{"max":3}}', spec), { column: "price", min: 0, rules: { max: 3 } });
    const refused = (json, pattern) =>
        assert.throws(() => parseConfig(json, spec), (e) => e instanceof PluginError && e.tag === "invalid-config" && pattern.test(e.message));
    refused('{"column":"price","minimum":1,"rules":{"max":3}}', /^unknown field `minimum`, expected one of `column`, `min`, `rules`$/);
    refused('{"rules":{"max":3}}', /^`column`: missing field `column`$/);
    refused('{"column":7,"rules":{"max":3}}', /^`column`: expected a string, got number 7$/);
    refused('{"column":"p","rules":{"max":1.5}}', /^`rules.max`: expected an integer, got number 1.5$/);
    refused('{"column":"p","rules":[]}', /^`rules`: expected a map, got a list$/);
    refused('{"column":"p","rules":{"mux":3}}', /^`rules`: unknown field `mux`, expected one of `max`$/);
    refused('{"column":"p","constructor":1,"rules":{"max":3}}', /^unknown field `constructor`/);
    refused("{not json", /^the config is not JSON/);
    assert.deepEqual(parseConfig("", { n: config.integer({ default: 2 }) }), { n: 2 });
});

const everyType = new Schema([
    new Field("i64", new Int64(), true),
    new Field("i32", new Int32(), true),
    new Field("f", new Float64(), true),
    new Field("b", new Bool(), true),
    new Field("s", new Utf8(), true),
    new Field("bin", new Binary(), true),
    new Field("ts", new TimestampMicrosecond("UTC"), true),
    new Field("d", new DateDay(), true),
]);

function sample() {
    return makeBatch(everyType, {
        i64: [1n, null, 9007199254740993n, -4n, 5n],
        i32: [1, 2, null, 4, 5],
        f: [0.5, 1.5, 2.5, null, 4.5],
        b: [true, false, null, true, false],
        s: ["a", "", "ccc", "dé", null],
        bin: [Uint8Array.of(1), null, Uint8Array.of(), Uint8Array.of(2, 3), Uint8Array.of(4)],
        // µs that a float millisecond cannot hold.
        ts: [1731421801123457n, 1731421801123458n, null, -1n, 0n],
        d: [20000, null, 1, 2, 3],
    });
}

test("filter and take keep every type exact, nulls included", () => {
    const batch = sample();
    const all = rows(batch);
    assert.equal(all[0].ts, 1731421801123457n);
    assert.equal(all[2].i64, 9007199254740993n);
    const kept = batch.filter(Uint8Array.of(1, 0, 1, 1, 0));
    assert.deepEqual(rows(kept), [all[0], all[2], all[3]]);
    const taken = batch.take(Int32Array.of(4, 1, 1));
    assert.deepEqual(rows(taken), [all[4], all[1], all[1]]);
    assert.equal(batch.filter([1, 1, 1, 1, 1]), batch, "nothing dropped: the same batch");
    assert.equal(batch.filter(new Uint8Array(5)).numRows, 0);
});

test("a slice with an offset reads and filters its own rows", () => {
    const batch = sample();
    const sliced = new Batch(batch.recordBatch.slice(1, 4));
    const all = rows(batch);
    assert.deepEqual(rows(sliced), all.slice(1, 4));
    assert.deepEqual(rows(sliced.filter(Uint8Array.of(0, 1, 1))), all.slice(2, 4));
    assert.equal(sliced.column("b").isValid(1), false);
    assert.equal(sliced.column("b").get(2), true);
});

test("typed column access checks the type and names the column", () => {
    const batch = sample();
    assert.ok(batch.timestampMicros("ts").values instanceof BigInt64Array);
    assert.ok(batch.float64("f").values instanceof Float64Array);
    assert.throws(() => batch.float64("i64"), /column `i64` is Int64, expected float64/);
    assert.throws(() => batch.column("nope"), /the input has no column `nope`/);
    assert.equal(requireColumn(everyType, "f", "float64", "column"), 2);
    assert.throws(() => requireColumn(everyType, "s", "float64", "column"), (e) => e.tag === "invalid-config" && /^`column`: column `s` is Utf8, expected float64/.test(e.message));
});

// A plugin that passes its input on, rejects rows with a negative `i64`, and keeps a count.
const passThrough = definePlugin({
    name: "pass",
    stateVersion: 3,
    config: { reject_negative: config.boolean({ default: true }) },
    create(cfg, input) {
        let passed = 0n;
        const step = {
            process(batch) {
                const out = new Output();
                const i64 = batch.int64("i64");
                for (let i = 0; i < batch.numRows; i++) {
                    if (cfg.reject_negative && i64.isValid(i) && i64.values[i] < 0n) out.reject(i, "negative");
                }
                passed += BigInt(batch.numRows - out.rejected.length);
                return out.push(batch);
            },
            onWatermark(ts) {
                return new Output().push(makeBatch(input, Object.fromEntries(input.fields.map((f) => [f.name, [null]]))));
            },
            snapshot() {
                const bytes = new Uint8Array(8);
                new DataView(bytes.buffer).setBigUint64(0, passed, true);
                return bytes;
            },
            restore(version, bytes) {
                if (version !== 3) throw new PluginError("bad-input", `state version ${version}`);
                passed = new DataView(bytes.buffer, bytes.byteOffset, 8).getBigUint64(0, true);
            },
        };
        return { step, schema: input };
    },
});

test("through the host's IPC: rejected rows leave the output, timestamps stay µs", () => {
    const step = instantiate(passThrough, {}, everyType);
    const out = step.process(sample());
    const all = rows(sample());
    assert.deepEqual(out.rejected, [{ row: 3, reason: "negative" }]);
    assert.deepEqual(rows(out.batches), [all[0], all[1], all[2], all[4]]);
    const wm = step.onWatermark(1_700_000_000_000);
    assert.equal(wm.batches[0].numRows, 1);
    assert.deepEqual(wm.rejected, []);
});

test("state is framed as the Rust SDK frames it and refused when it is not a state", () => {
    const step = instantiate(passThrough, {}, everyType);
    step.process(sample());
    const state = step.snapshot();
    assert.deepEqual([...state.subarray(0, 8)], [0x46, 0x47, 0x53, 0x31, 3, 0, 0, 0], "FGS1, version 3");
    const again = instantiate(passThrough, {}, everyType);
    again.restore(state);
    assert.deepEqual(again.snapshot(), state);
    assert.throws(() => again.restore(Uint8Array.of(1, 2)), (e) => e.tag === "bad-input" && /too short for its header/.test(e.message));
    assert.throws(() => again.restore(new Uint8Array(16)), (e) => e.tag === "bad-input" && /not a Flowgate snapshot/.test(e.message));
});

test("a stateless plugin refuses a state with bytes in it, or of another version", () => {
    const stateless = definePlugin({ name: "nothing", create: (cfg, input) => ({ step: { process: (b) => new Output().push(b) }, schema: input }) });
    const step = instantiate(stateless, {}, everyType);
    const empty = step.snapshot();
    assert.deepEqual([...empty], [0x46, 0x47, 0x53, 0x31, 0, 0, 0, 0]);
    step.restore(empty);
    const withBytes = Uint8Array.of(0x46, 0x47, 0x53, 0x31, 0, 0, 0, 0, 9);
    assert.throws(() => step.restore(withBytes), /keeps no state but was given 1 bytes/);
    assert.throws(() => step.restore(Uint8Array.of(0x46, 0x47, 0x53, 0x31, 2, 0, 0, 0)), /reads state version 0, got 2/);
});

test("a rejected row past the batch is the plugin's bug, named", () => {
    const liar = definePlugin({
        name: "liar",
        create: (cfg, input) => ({ step: { process: (b) => new Output().push(b).reject(99, "x") }, schema: input }),
    });
    const step = instantiate(liar, {}, everyType);
    assert.throws(() => step.process(sample()), (e) => e.tag === "internal" && /rejected row 99 of a batch of 5 rows/.test(e.message));
});

test("an exception that is not a PluginError is thrown on (the guest traps), after printing it", () => {
    const buggy = definePlugin({
        name: "buggy",
        create: (cfg, input) => ({
            step: {
                process() {
                    throw new TypeError("price.toFixed is not a function");
                },
            },
            schema: input,
        }),
    });
    const step = instantiate(buggy, {}, everyType);
    const printed = [];
    const error = console.error;
    console.error = (m) => printed.push(String(m));
    try {
        assert.throws(() => step.process(sample()), TypeError);
    } finally {
        console.error = error;
    }
    assert.equal(printed.length, 1);
    assert.match(printed[0], /^Uncaught TypeError: price.toFixed is not a function\n/);
});

test("schemaOf builds what the host decodes a pipeline's columns to", () => {
    const schema = schemaOf({ symbol: "utf8", ts: "timestamp" });
    assert.equal(String(schema.fields[1].type), "Timestamp<MICROSECOND, UTC>");
    assert.throws(() => schemaOf({ x: "decimal" }), /unknown type `decimal`/);
});

test("validity() is null without nulls, else 1 per row with a value (slices too)", () => {
    const batch = sample();
    assert.equal(batch.column("s").validity() !== null, true);
    assert.deepEqual([...batch.column("f").validity()], [1, 1, 1, 0, 1]);
    const sliced = new Batch(batch.recordBatch.slice(2, 5)); // rows 2..5
    assert.deepEqual([...sliced.column("f").validity()], [1, 0, 1]);
    const full = makeBatch(everyType, { i64: [1n], i32: [1], f: [1], b: [true], s: ["x"], bin: [Uint8Array.of(1)], ts: [1n], d: [1] });
    assert.equal(full.column("f").validity(), null);
});

test("filter copies runs of rows, and take gathers, across a batch with long and short runs", () => {
    const n = 1000;
    const schema = new Schema([new Field("s", new Utf8(), true), new Field("x", new Int64(), true), new Field("f", new Float64(), true)]);
    const s = [], x = [], f = [];
    for (let i = 0; i < n; i++) {
        s.push(i % 13 === 0 ? null : "v".repeat(i % 5) + i);
        x.push(i % 17 === 0 ? null : BigInt(i) * 4294967297n);
        f.push(i * 0.5);
    }
    const batch = makeBatch(schema, { s, x, f });
    const keep = new Uint8Array(n);
    for (let i = 0; i < n; i++) keep[i] = (i % 7 < 4 || (i > 500 && i < 600)) && i !== n - 1 ? 1 : 0;
    const all = rows(batch);
    const want = all.filter((_, i) => keep[i]);
    assert.deepEqual(rows(batch.filter(keep)), want);
    const idx = Int32Array.from(want.map((_, j) => j).map((j) => all.indexOf(want[j])));
    assert.deepEqual(rows(batch.take(idx)), want);
    const first = new Uint8Array(n);
    first[0] = 1;
    assert.deepEqual(rows(batch.filter(first)), [all[0]]);
});

test("a rejected row leaves an output that is the input with a column added, not one the plugin filtered", () => {
    const schema = schemaOf({ s: "utf8", x: "float64" });
    const wider = new Schema([...schema.fields, new Field("y", new Float64(), true)]);
    const make = (build) =>
        instantiate(
            definePlugin({ name: "t", create: (cfg, input) => ({ step: { process: build }, schema: build.schema ?? input }) }),
            {},
            schema,
        );
    const input = makeBatch(schema, { s: ["a", "b", "c", "d", "e"], x: [1, 2, 3, 4, 5] });
    const added = (batch) =>
        new Output().push(makeBatch(wider, { s: batch.column("s"), x: batch.column("x"), y: [0, 0, 0, 0, 0] })).reject(1, "bad");
    added.schema = wider;
    assert.deepEqual(rows(make(added).process(input).batches).map((r) => r.s), ["a", "c", "d", "e"]);
    const filtered = (batch) => new Output().push(batch.filter([1, 1, 1, 1, 0])).reject(1, "bad");
    assert.deepEqual(rows(make(filtered).process(input).batches).map((r) => r.s), ["a", "b", "c", "d"]);
    const watermark = definePlugin({
        name: "w",
        create: (cfg, input) => ({ step: { process: (b) => new Output(), onWatermark: () => new Output().reject(0, "x") }, schema: input }),
    });
    assert.throws(() => instantiate(watermark, {}, schema).onWatermark(1), /`onWatermark` has no input rows to reject/);
});

test("makeBatch refuses another batch's column of another type", () => {
    const ints = makeBatch(new Schema([new Field("n", new Int32(), true)]), { n: [1, 2] });
    assert.throws(() => makeBatch(new Schema([new Field("n", new Int64(), true)]), { n: ints.column("n") }), /column `n` is Int64, given Int32/);
});

test("filter agrees with a row-by-row copy on random masks, nulls, slices and sizes", () => {
    // A seeded generator: the same cases each run.
    let seed = 7;
    const random = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32);
    const schema = new Schema([new Field("s", new Utf8(), true), new Field("b", new Bool(), true), new Field("f", new Float64(), true)]);
    for (let trial = 0; trial < 200; trial++) {
        const n = 1 + Math.floor(random() * 70);
        const nulls = random();
        const s = [], b = [], f = [];
        for (let i = 0; i < n; i++) {
            s.push(random() < nulls ? null : `r${i}`);
            b.push(random() < nulls ? null : random() < 0.5);
            f.push(random() < nulls ? null : i + 0.25);
        }
        let batch = makeBatch(schema, { s, b, f });
        const at = Math.floor(random() * n);
        const length = Math.floor(random() * (n - at + 1));
        batch = new Batch(batch.recordBatch.slice(at, at + length));
        const density = random();
        const keep = new Uint8Array(length);
        for (let i = 0; i < length; i++) keep[i] = random() < density ? 1 + Math.floor(random() * 3) : 0;
        const all = rows(batch);
        const want = all.filter((_, i) => keep[i]);
        assert.deepEqual(rows(batch.filter(keep)), want, `trial ${trial}`);
        assert.deepEqual(rows(batch.filter([...keep].map((k) => k > 0))), want, `trial ${trial} (booleans)`);
        const valid = batch.column("f").validity();
        assert.deepEqual(valid === null ? null : [...valid], all.some((r) => r.f === null) ? all.map((r) => (r.f === null ? 0 : 1)) : null);
    }
    assert.throws(() => makeBatch(schema, { s: ["a"], b: [true], f: [1] }).filter(new Uint8Array(2)), /the mask has 2 entries for 1 rows/);
});

test("the SDK's own IPC writer gives what apache-arrow reads back, and leaves sliced columns to apache-arrow", () => {
    const batch = sample();
    const filtered = batch.filter(Uint8Array.of(0, 1, 1, 0, 1));
    const bytes = _writeFlatStream(everyType, [batch.recordBatch, filtered.recordBatch]);
    assert.notEqual(bytes, null);
    const reader = RecordBatchReader.from(bytes);
    const back = [...reader].map((rb) => rows(new Batch(rb)));
    assert.deepEqual(back, [rows(batch), rows(filtered)]);
    const sliced = new Batch(batch.recordBatch.slice(1, 3));
    assert.equal(_writeFlatStream(everyType, [sliced.recordBatch]), null);
});
