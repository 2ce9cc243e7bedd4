"""The plugin's logic, with the machine's Python and nothing installed: `python3 -m unittest`."""

import unittest

from flowgate import PluginError
from flowgate.testing import instantiate, make_batch, schema_of
from plugin import plugin

SCHEMA = schema_of({"symbol": "utf8", "price": "float64"})


class FilterTest(unittest.TestCase):
    def test_keeps_rows_at_least_min_and_rejects_missing_values(self):
        step = instantiate(plugin, {"column": "price", "min": 10}, SCHEMA)
        out = step.process(make_batch(SCHEMA, {"symbol": ["AAPL", "MSFT", "GOOG"], "price": [12.5, 3.25, None]}))
        self.assertEqual(out.rows, [{"symbol": "AAPL", "price": 12.5}])
        self.assertEqual(out.rejected, [(2, "the value is missing")])

    def test_a_config_key_it_does_not_know_is_refused_naming_it(self):
        with self.assertRaisesRegex(PluginError, "unknown field `minimum`") as e:
            instantiate(plugin, {"column": "price", "minimum": 10}, SCHEMA)
        self.assertEqual(e.exception.tag, "invalid-config")


if __name__ == "__main__":
    unittest.main()
