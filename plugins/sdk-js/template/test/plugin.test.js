// The plugin's logic, under node: `npm test`.
import assert from "node:assert/strict";
import { test } from "node:test";

import { instantiate, makeBatch, rows, schemaOf } from "../flowgate/testing.js";
import { transform } from "../src/plugin.js";

const schema = schemaOf({ symbol: "utf8", price: "float64" });

test("keeps rows at least min and rejects missing values", () => {
    const step = instantiate(transform, { column: "price", min: 10 }, schema);
    const out = step.process(makeBatch(schema, { symbol: ["AAPL", "MSFT", "GOOG"], price: [12.5, 3.25, null] }));
    assert.deepEqual(rows(out.batches), [{ symbol: "AAPL", price: 12.5 }]);
    assert.deepEqual(out.rejected, [{ row: 2, reason: "the value is missing" }]);
});

test("a config key it does not know is refused, naming it", () => {
    assert.throws(() => instantiate(transform, { column: "price", minimum: 10 }, schema), {
        tag: "invalid-config",
        message: /unknown field `minimum`/,
    });
});
