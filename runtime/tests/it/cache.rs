//! The compiled-plugin cache: the second load of a plugin does not compile it again.

use crate::common;

use std::time::Duration;

use flowgate::plugin::{Compile, HostConfig, PluginHost};

#[test]
fn second_load_comes_from_the_cache() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = HostConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        call_timeout: Duration::from_secs(5),
        memory_limit: 256 << 20,
        compile: Compile::Optimized,
    };
    let path = common::plugin("flowgate_pct_change");

    let first = PluginHost::new(config.clone())
        .expect("host")
        .load(&path)
        .expect("load");
    assert!(!first.load_stats().cache_hit, "an empty cache cannot hit");
    let artifacts: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .collect();
    assert_eq!(artifacts.len(), 1, "one compiled artifact written");

    // A new host (as after a restart) finds it.
    let second = PluginHost::new(config.clone())
        .expect("host")
        .load(&path)
        .expect("load");
    assert!(
        second.load_stats().cache_hit,
        "second load must come from the cache"
    );
    assert_eq!(
        second.info().expect("cached plugin runs").name,
        "pct_change"
    );

    // A corrupt artifact is ignored and replaced, not trusted. (Replaced by rename, as the cache
    // itself writes: a loaded plugin maps its artifact, so it must never change in place.)
    drop(second);
    let tmp = dir.path().join("garbage.tmp");
    std::fs::write(&tmp, b"garbage").expect("corrupt");
    std::fs::rename(&tmp, artifacts[0].path()).expect("corrupt");
    let third = PluginHost::new(config)
        .expect("host")
        .load(&path)
        .expect("load despite corrupt cache");
    assert!(!third.load_stats().cache_hit);
    assert_eq!(third.info().expect("runs").name, "pct_change");
}
