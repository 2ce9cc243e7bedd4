// `ema` in JavaScript: the Rust test plugin tests/plugins/ema, line for line (see its docs). The
// languages must give the same rows and the same state bytes.
import { Field, Float64, Output, Schema, badInput, config, definePlugin, invalidConfig, makeBatch, requireColumn } from "../../../plugins/sdk-js/flowgate.js";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

function compareBytes(a, b) {
    const n = Math.min(a.length, b.length);
    for (let i = 0; i < n; i++) if (a[i] !== b[i]) return a[i] - b[i];
    return a.length - b.length;
}

class Ema {
    constructor(key, column, alpha, schema) {
        this.key = key;
        this.column = column;
        this.alpha = alpha;
        this.schema = schema;
        this.averages = new Map();
    }

    process(batch) {
        const keys = batch.utf8(this.key);
        const values = batch.float64(this.column);
        const x = values.values;
        const n = batch.numRows;
        const ema = new Array(n);
        for (let i = 0; i < n; i++) {
            if (!keys.isValid(i) || !values.isValid(i)) {
                ema[i] = null;
                continue;
            }
            const key = keys.get(i);
            const previous = this.averages.get(key);
            const average = previous === undefined ? x[i] : this.alpha * x[i] + (1 - this.alpha) * previous;
            this.averages.set(key, average);
            ema[i] = average;
        }
        const columns = {};
        for (const field of batch.schema.fields) columns[field.name] = batch.column(field.name);
        columns.ema = ema;
        return new Output().push(makeBatch(this.schema, columns));
    }

    snapshot() {
        const entries = [...this.averages].map(([k, v]) => [encoder.encode(k), v]).sort((a, b) => compareBytes(a[0], b[0]));
        const size = 4 + entries.reduce((n, [k]) => n + 4 + k.length + 8, 0);
        const out = new Uint8Array(size);
        const view = new DataView(out.buffer);
        view.setUint32(0, entries.length, true);
        let at = 4;
        for (const [k, v] of entries) {
            view.setUint32(at, k.length, true);
            out.set(k, at + 4);
            view.setFloat64(at + 4 + k.length, v, true);
            at += 4 + k.length + 8;
        }
        return out;
    }

    restore(version, state) {
        if (version !== 1) throw badInput(`\`ema\` reads state version 1, got ${version}`);
        const view = new DataView(state.buffer, state.byteOffset, state.byteLength);
        const need = (at, n) => {
            if (at + n > state.length) throw badInput("`ema`: the state is truncated");
        };
        need(0, 4);
        const count = view.getUint32(0, true);
        let at = 4;
        const averages = new Map();
        for (let i = 0; i < count; i++) {
            need(at, 4);
            const len = view.getUint32(at, true);
            need(at + 4, len + 8);
            const key = decoder.decode(state.subarray(at + 4, at + 4 + len));
            averages.set(key, view.getFloat64(at + 4 + len, true));
            at += 4 + len + 8;
        }
        if (at !== state.length) throw badInput(`\`ema\`: ${state.length - at} bytes after the last key`);
        this.averages = averages;
    }
}

export const transform = definePlugin({
    name: "ema",
    stateVersion: 1,
    config: { key: config.string(), column: config.string(), alpha: config.number() },
    create(cfg, input) {
        requireColumn(input, cfg.key, "utf8", "key");
        requireColumn(input, cfg.column, "float64", "column");
        if (!(cfg.alpha > 0 && cfg.alpha <= 1)) throw invalidConfig("alpha", "must be in (0, 1]");
        const schema = new Schema([...input.fields, new Field("ema", new Float64(), true)]);
        return { step: new Ema(cfg.key, cfg.column, cfg.alpha, schema), schema };
    },
});
