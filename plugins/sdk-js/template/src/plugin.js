// `{{name}}`: keeps the rows whose `column` is at least `min`; a row whose value is missing goes
// to the dead letter with the reason.
import { Output, config, definePlugin, requireColumn } from "../flowgate/flowgate.js";

class Filter {
    constructor(column, min) {
        this.column = column;
        this.min = min;
    }

    process(batch) {
        const prices = batch.float64(this.column);
        const values = prices.values; // a Float64Array: row i is values[i]
        const valid = prices.validity(); // null when no value is missing, else 1 or 0 per row
        const min = this.min;
        const n = batch.numRows;
        const keep = new Uint8Array(n);
        const output = new Output();
        for (let i = 0; i < n; i++) {
            if (valid !== null && valid[i] === 0) {
                output.reject(i, "the value is missing");
            } else if (values[i] >= min) {
                keep[i] = 1;
            }
        }
        // Copies the kept rows' runs: cheaper than building the output row by row.
        return output.push(batch.filter(keep));
    }
}

export const transform = definePlugin({
    name: "{{name}}",
    version: "0.1.0",
    // The step's `config:` block in the pipeline file; other keys are refused.
    config: {
        column: config.string(), // a float64 column of the input
        min: config.number(), // rows below it are dropped
    },
    create(cfg, input) {
        requireColumn(input, cfg.column, "float64", "column");
        // Same columns out as in.
        return { step: new Filter(cfg.column, cfg.min), schema: input };
    },
});
