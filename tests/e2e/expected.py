"""Bars computed independently from raw ticks with pandas: what the stock pipeline must write."""
import json
import re

import pandas as pd

SYMBOL = re.compile(r"^[A-Z][A-Z0-9.]{0,9}$")


def parse_ticks(lines):
    """Valid, decodable ticks as a DataFrame (the rules of pipelines/stocks.yaml's validate step)."""
    rows = []
    for line in lines:
        try:
            t = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(t, dict):
            continue
        sym, price, vol, ts = t.get("symbol"), t.get("price"), t.get("volume"), t.get("ts")
        if not isinstance(price, (int, float)) or isinstance(price, bool) or not isinstance(vol, int) or ts is None:
            continue
        if not isinstance(sym, str) or not SYMBOL.match(sym) or price <= 0 or vol < 0:
            continue
        rows.append({"symbol": sym, "price": float(price), "volume": vol,
                     "ts": pd.Timestamp(ts).tz_convert("UTC").floor("us")})
    return pd.DataFrame(rows)


def expected_bars(df, watermark_delay_ms, newest=None):
    """1-minute OHLCV bars per symbol with pct_change, for windows the final watermark closed
    (the newest event time `newest`, default the newest of `df`, less the delay)."""
    df = df.drop_duplicates(subset=["symbol", "ts"], keep="first").copy()
    newest = df["ts"].max() if newest is None else newest
    watermark = newest - pd.Timedelta(milliseconds=watermark_delay_ms)
    df["window_start"] = df["ts"].dt.floor("1min")
    df = df.sort_values(["symbol", "ts"], kind="stable")
    g = df.groupby(["symbol", "window_start"], sort=True)
    bars = pd.DataFrame({
        "open": g["price"].first(),
        "high": g["price"].max(),
        "low": g["price"].min(),
        "close": g["price"].last(),
        "avg_price": g["price"].mean(),
        "volume": g["volume"].sum(),
        "trades": g["price"].count(),
    }).reset_index()
    bars = bars[bars["window_start"] + pd.Timedelta(minutes=1) <= watermark].copy()
    bars["pct_change"] = bars.groupby("symbol")["close"].pct_change(fill_method=None)
    return bars.sort_values(["symbol", "window_start"]).reset_index(drop=True)


def newest_event(lines):
    """The newest event time of the records that decode (what a partition's watermark follows:
    records a step refuses later count too)."""
    newest = None
    for line in lines:
        try:
            t = json.loads(line)
            ts = pd.Timestamp(t["ts"]).tz_convert("UTC").floor("us")
        except Exception:
            continue
        newest = ts if newest is None or ts > newest else newest
    return newest


def expected_bars_hop(lines_by_partition, watermark_delay_ms):
    """Bars behind the repartition hop: every tick of a symbol together, whatever partition it
    came in; windows closed by the slowest source partition's watermark."""
    lines = [line for ls in lines_by_partition.values() for line in ls]
    slowest = min(n for n in (newest_event(ls) for ls in lines_by_partition.values()) if n is not None)
    return expected_bars(parse_ticks(lines), watermark_delay_ms, newest=slowest)
