//! A Kafka producer with its own thread serving its events.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::{BaseProducer, Producer, ProducerContext, PurgeConfig};

/// A producer and the thread that serves its events (delivery reports, errors, log lines) as
/// they come.
///
/// Not rdkafka's `ThreadedProducer`: its thread polls 100 ms at a time, and each poll ends in a
/// spin. rdkafka hands librdkafka the time left rounded down to whole milliseconds, so the first
/// wait is 99 ms and the last fraction of a millisecond is spent calling librdkafka with a wait
/// of 0: ~0.8 ms of a core every 100 ms, a third of an idle process's CPU (`strace` and `perf` on
/// an idle `pipelines/stocks.yaml` run). This thread polls 250 ms at a time (delivery reports are
/// served as they come either way; the wait only bounds how soon the thread sees the stop flag).
pub(crate) struct PolledProducer<C: ProducerContext + 'static> {
    producer: Arc<BaseProducer<C>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl<C: ProducerContext + 'static> PolledProducer<C> {
    /// How long each poll of the thread waits when no event comes.
    const WAIT: Duration = Duration::from_millis(250);

    /// Creates the producer with `context` and starts its thread, named `thread_name`.
    pub(crate) fn new(config: &ClientConfig, context: C, thread_name: &str) -> KafkaResult<Self> {
        let producer: Arc<BaseProducer<C>> = Arc::new(config.create_with_context(context)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (polled, stopped) = (producer.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(thread_name.into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    polled.poll(Self::WAIT);
                }
            })
            .map_err(|e| {
                KafkaError::ClientCreation(format!("cannot start the producer's thread: {e}"))
            })?;
        Ok(PolledProducer {
            producer,
            stop,
            thread: Some(thread),
        })
    }
}

impl<C: ProducerContext + 'static> std::ops::Deref for PolledProducer<C> {
    type Target = BaseProducer<C>;
    fn deref(&self) -> &Self::Target {
        &self.producer
    }
}

impl<C: ProducerContext + 'static> Drop for PolledProducer<C> {
    /// Drops what is not delivered yet at once (as `ThreadedProducer`'s drop does: an owner that
    /// needs its messages delivered flushes first, as the repartition hop does before it commits
    /// past them), so that no stale message of this producer lands after the next owner's; then
    /// stops the thread (within [`Self::WAIT`]) and lets the producer go with it, before whatever
    /// it was connected to (the embedded broker) goes.
    fn drop(&mut self) {
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
