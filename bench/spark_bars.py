"""The stocks pipeline's logic in PySpark Structured Streaming, for the side-by-side benchmark.

Same input as Flowgate's file-source run (JSON-lines ticks), same logic as pipelines/stocks.yaml:
parse with the same schema; drop rows failing the same rules (not-null symbol/price/volume/ts,
symbol pattern, price > 0, volume >= 0, ts at most 1 minute ahead of the wall clock); drop
duplicate (symbol, ts) within the 5 s watermark; 1-minute tumbling OHLCV bars per symbol (open
and close by event time); pct_change of close per symbol; bars written as Parquet.

    python bench/spark_bars.py --input DIR --output DIR --checkpoint DIR --report FILE

Runs `local[2]` with `trigger(availableNow=True)` (every file present, then stop). Prints and
writes a JSON report: rows in, bars out, query wall time, and the CPU seconds of the JVM (from
/proc/<pid>/stat) and of this Python driver over the query.
"""

import argparse
import json
import os
import resource
import time

from pyspark.sql import SparkSession, Window
from pyspark.sql import functions as F

SCHEMA = "symbol STRING, price DOUBLE, volume BIGINT, ts TIMESTAMP, ts_epoch_ms BIGINT"


def jvm_cpu_seconds(spark):
    """User + system CPU seconds of the JVM process so far, from /proc/<pid>/stat."""
    with open(f"/proc/{jvm_pid(spark)}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def jvm_pid(spark):
    return int(spark._jvm.java.lang.ProcessHandle.current().pid())


def peak_rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder of JSON-lines tick files")
    p.add_argument("--output", required=True, help="Parquet bars folder")
    p.add_argument("--checkpoint", required=True, help="Structured Streaming checkpoint folder")
    p.add_argument("--report", required=True, help="JSON report to write")
    p.add_argument("--files-per-trigger", type=int, default=1)
    p.add_argument("--driver-memory", default="6g")
    args = p.parse_args()

    spark = (
        SparkSession.builder.master("local[2]")
        .appName("flowgate-bench-spark-bars")
        .config("spark.driver.memory", args.driver_memory)
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.streaming.numRecentProgressUpdates", "10000")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("WARN")

    ticks = (
        spark.readStream.schema(SCHEMA)
        .option("timestampFormat", "yyyy-MM-dd'T'HH:mm:ss.SSSSSSXXX")
        .option("maxFilesPerTrigger", args.files_per_trigger)
        .json(args.input)
    )
    valid = ticks.where(
        F.col("symbol").isNotNull()
        & F.col("symbol").rlike("^[A-Z][A-Z0-9.]{0,9}$")
        & F.col("price").isNotNull()
        & (F.col("price") > 0)
        & F.col("volume").isNotNull()
        & (F.col("volume") >= 0)
        & F.col("ts").isNotNull()
        & (F.col("ts") <= F.current_timestamp() + F.expr("INTERVAL 1 MINUTE"))
    )
    deduped = valid.withWatermark("ts", "5 seconds").dropDuplicatesWithinWatermark(["symbol", "ts"])
    bars = deduped.groupBy(F.window("ts", "1 minute"), "symbol").agg(
        F.min_by("price", "ts").alias("open"),
        F.max("price").alias("high"),
        F.min("price").alias("low"),
        F.max_by("price", "ts").alias("close"),
        F.avg("price").alias("avg_price"),
        F.sum("volume").alias("volume"),
        F.count("*").alias("trades"),
    )

    # pct_change across micro-batches: the last close per symbol is kept on the driver (a few
    # thousand rows), as a Structured Streaming job would do it in foreachBatch.
    last_close = {}

    def write_batch(df, batch_id):
        b = df.select(
            "symbol",
            F.col("window.start").alias("window_start"),
            F.col("window.end").alias("window_end"),
            "open", "high", "low", "close", "avg_price", "volume", "trades",
        )
        w = Window.partitionBy("symbol").orderBy("window_start")
        b = b.withColumn("prev", F.lag("close").over(w))
        if last_close:
            prev = spark.createDataFrame(list(last_close.items()), "symbol STRING, carried DOUBLE")
            b = b.join(F.broadcast(prev), "symbol", "left").withColumn(
                "prev", F.coalesce("prev", "carried")).drop("carried")
        b = b.withColumn("pct_change", (F.col("close") - F.col("prev")) / F.col("prev")).drop("prev")
        b = b.cache()
        b.write.mode("append").parquet(args.output)
        for r in b.groupBy("symbol").agg(F.max_by("close", "window_start").alias("c")).collect():
            last_close[r["symbol"]] = r["c"]
        b.unpersist()

    cpu0, py0 = jvm_cpu_seconds(spark), resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    query = (
        bars.writeStream.outputMode("append")
        .foreachBatch(write_batch)
        .option("checkpointLocation", args.checkpoint)
        .trigger(availableNow=True)
        .start()
    )
    query.awaitTermination()
    wall = time.monotonic() - started
    cpu1, py1 = jvm_cpu_seconds(spark), resource.getrusage(resource.RUSAGE_SELF)
    rows_in = sum(p["numInputRows"] for p in query.recentProgress)
    bars_out = spark.read.parquet(args.output).count()
    report = {
        "rows_in": rows_in,
        "micro_batches": len(query.recentProgress),
        "bars_out": bars_out,
        "query_wall_seconds": wall,
        "jvm_cpu_seconds": cpu1 - cpu0,
        "driver_cpu_seconds": (py1.ru_utime + py1.ru_stime) - (py0.ru_utime + py0.ru_stime),
        "jvm_peak_rss_kb": peak_rss_kb(jvm_pid(spark)),
        "spark_version": spark.version,
    }
    report["cpu_seconds"] = report["jvm_cpu_seconds"] + report["driver_cpu_seconds"]
    with open(args.report, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report))
    spark.stop()


if __name__ == "__main__":
    main()
