"""`{{name}}`: keeps the rows whose `column` is at least `min`; a row whose value is missing goes
to the dead letter with the reason."""

from flowgate import Output, compare, config, define_plugin, null_rows, require_column


class Filter:
    def __init__(self, column, minimum):
        self.column = column
        self.min = minimum

    def process(self, batch):
        prices = batch.column(self.column)
        output = Output()
        for row in null_rows(prices):
            output.reject(row, "the value is missing")
        # One byte per row, 1 where the value is at least `min` (0 where it is missing): built
        # at C speed, as a loop over the rows in Python would not be.
        keep = compare(prices, ">=", self.min)
        return output.push(batch.filter(keep))


def create(cfg, schema):
    require_column(schema, cfg["column"], "float64", "column")
    # Same columns out as in.
    return Filter(cfg["column"], cfg["min"]), schema


plugin = define_plugin(
    name="{{name}}",
    version="0.1.0",
    # The step's `config:` block in the pipeline file; other keys are refused.
    config={
        "column": config.string(),  # a float64 column of the input
        "min": config.number(),  # rows below it are dropped
    },
    create=create,
)
