//! Webhooks: registry changes POSTed as JSON to the URLs `[[registry.webhooks]]` names, as
//! MLflow's registry webhooks do. Each change is written to the outbox (`webhook_outbox`, by
//! sequence number) in the same synced batch as the change itself, and each hook keeps its place in it
//! (`webhook_cursors`): a change not yet delivered when the node stops, or dies, is sent once it
//! runs again, so a hook gets every change at least once (`seq` in the body tells a repeat). Each
//! hook has its own task, so changes reach it in the order they happened and a slow or dead hook
//! holds no other back. A delivery that fails (no answer, or not 2xx) is tried again after 1, 2,
//! 4 and 8 seconds, then given up with a warning and a metric. A hook new to the configuration
//! starts with the changes after it was added.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::RegistryEvent;
use crate::store::{
    Store, StoreError,
    tables::{WebhookCursors, WebhookOutbox},
};

/// Tries of one delivery.
pub const ATTEMPTS: u32 = 5;
/// Changes read from the outbox at a time.
const READ: usize = 64;
/// How often delivered changes are pruned from the outbox.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// `[[registry.webhooks]]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// Where events are POSTed (http or https).
    pub url: String,
    /// Event kinds to send (`version_created`, `stage_changed`, `alias_set`, …); empty: all.
    #[serde(default)]
    pub events: Vec<String>,
    /// When set, each body is signed: `Agora-Signature: sha256=<hex HMAC-SHA256(secret, body)>`.
    #[serde(default)]
    pub secret: Option<String>,
}

impl Webhook {
    pub fn check(&self) -> Result<(), String> {
        let url = url::Url::parse(&self.url).map_err(|e| format!("url {:?} is not a URL: {e}", self.url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("url {:?} must use http or https", self.url));
        }
        if self.secret.as_ref().is_some_and(|s| s.is_empty()) {
            return Err(format!("the secret of {:?} is empty; leave it out to send unsigned", self.url));
        }
        if self.events.iter().any(|e| e.trim().is_empty()) {
            return Err(format!("the events of {:?} hold an empty name", self.url));
        }
        Ok(())
    }

    fn wants(&self, kind: &str) -> bool {
        self.events.is_empty() || self.events.iter().any(|e| e == kind)
    }

    /// Its place in the outbox is kept under this: a hook whose URL or kinds change starts anew.
    fn key(&self) -> String {
        format!("{} {}", self.url, self.events.join(","))
    }
}

/// A registry change in the outbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEvent {
    pub kind: String,
    pub model: String,
    pub version: Option<u32>,
    pub detail: String,
    pub actor: String,
    /// When the registry made it, unix milliseconds.
    pub time_ms: u64,
}

/// What a hook receives.
#[derive(Serialize)]
struct Payload<'a> {
    /// The change's place in this node's outbox: a repeat delivery carries the same.
    seq: u64,
    #[serde(flatten)]
    event: &'a OutboxEvent,
}

/// The registry's side of the outbox: appends changes and wakes the hooks; cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    store: Store,
    /// The last sequence number written (0: none yet).
    last: Arc<Mutex<u64>>,
    written: watch::Sender<u64>,
    /// How each configured hook is doing, by its key.
    hooks: Arc<Mutex<std::collections::BTreeMap<String, HookStatus>>>,
}

/// How one hook is doing (`GET /api/v1/registry/webhooks`); its secret is never shown.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct HookStatus {
    pub url: String,
    /// The kinds it asked for (empty: all).
    pub events: Vec<String>,
    /// Whether its bodies are signed.
    pub signed: bool,
    /// The `seq` of the next change it is to get.
    pub next_seq: u64,
    /// Changes in the outbox it has not had yet (those of kinds it did not ask for are passed
    /// over when reached).
    pub behind: u64,
    /// Changes delivered, and given up after every attempt failed, since the node started.
    pub delivered: u64,
    pub failed: u64,
    /// The last change sent to it, and how that went.
    pub last: Option<Attempt>,
    /// A change being tried again now, with the last attempt's error.
    pub retrying: Option<Attempt>,
}

/// A change sent to a hook.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Attempt {
    pub seq: u64,
    pub kind: String,
    /// `delivered`, `failed` (given up) or `retrying`.
    pub outcome: String,
    pub attempts: u32,
    /// Why the last attempt failed: the hook's status code, or the connection's error.
    pub error: Option<String>,
    /// When the last attempt ended, unix milliseconds.
    pub at_ms: u64,
}

/// Every configured hook's status, with the outbox's newest `seq`.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct WebhooksView {
    pub last_seq: u64,
    pub hooks: Vec<HookStatus>,
}

impl Outbox {
    pub fn open(store: Store) -> Result<Self, StoreError> {
        let last = match store.scan::<WebhookOutbox>(&[], None, true).next().transpose()? {
            Some((key, _)) => u64::from_be_bytes(key.try_into().unwrap_or_default()),
            None => 0,
        };
        let (written, _) = watch::channel(last);
        Ok(Self { store, last: Arc::new(Mutex::new(last)), written, hooks: Default::default() })
    }

    /// Every configured hook's status.
    pub fn status(&self) -> WebhooksView {
        let last_seq = self.last();
        let hooks = self.hooks.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let hooks = hooks
            .values()
            .map(|h| HookStatus { behind: (last_seq + 1).saturating_sub(h.next_seq), ..h.clone() })
            .collect();
        WebhooksView { last_seq, hooks }
    }

    /// Changes `key`'s status with `change`.
    fn update(&self, key: &str, change: impl FnOnce(&mut HookStatus)) {
        let mut hooks = self.hooks.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(status) = hooks.get_mut(key) {
            change(status);
        }
    }

    /// Puts `events` into `batch`, numbered after the last change, so they enter the outbox
    /// with the change they tell of, or not at all. Once the batch is written, call
    /// [`Staged::written`] to wake the hooks; nothing else enters the outbox meanwhile.
    pub fn stage<'e>(
        &self,
        batch: &mut crate::store::Batch<'_>,
        events: impl IntoIterator<Item = &'e RegistryEvent>,
    ) -> Result<Staged<'_>, StoreError> {
        let last = self.last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut upto = *last;
        let time_ms = super::now_ms();
        for event in events {
            let record = OutboxEvent {
                kind: event.kind.to_owned(),
                model: event.model.clone(),
                version: event.version,
                detail: event.detail.clone(),
                actor: event.actor.clone(),
                time_ms,
            };
            upto += 1;
            batch.put::<WebhookOutbox>(&upto, &record)?;
        }
        Ok(Staged { last, upto, written: &self.written })
    }

    fn last(&self) -> u64 {
        *self.last.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Up to [`READ`] changes from `from` on.
    fn read(&self, from: u64) -> Result<Vec<(u64, OutboxEvent)>, StoreError> {
        let start = from.to_be_bytes();
        let mut out = Vec::new();
        for item in self.store.scan::<WebhookOutbox>(&[], Some(&start), false).take(READ) {
            let (key, event) = item?;
            out.push((u64::from_be_bytes(key.try_into().unwrap_or_default()), event));
        }
        Ok(out)
    }

    /// Deletes what every hook in `keys` has had, but the newest change (which keeps the
    /// sequence going across restarts).
    fn prune(&self, keys: &[String]) -> Result<u64, StoreError> {
        let mut lowest = self.last();
        for key in keys {
            lowest = lowest.min(self.store.get::<WebhookCursors>(key)?.unwrap_or(0).saturating_sub(1));
        }
        let mut batch = self.store.batch();
        let mut deleted = 0;
        for item in self.store.iter::<WebhookOutbox>() {
            let seq = u64::from_be_bytes(item?.0.try_into().unwrap_or_default());
            if seq >= lowest {
                break;
            }
            batch.delete::<WebhookOutbox>(&seq);
            deleted += 1;
        }
        if deleted > 0 {
            self.store.write(batch)?;
        }
        Ok(deleted)
    }
}

/// Changes staged in a batch, not yet in the outbox's count.
pub struct Staged<'a> {
    last: std::sync::MutexGuard<'a, u64>,
    upto: u64,
    written: &'a watch::Sender<u64>,
}

impl Staged<'_> {
    /// The batch is written: the changes count, and the hooks are woken.
    pub fn written(mut self) {
        *self.last = self.upto;
        self.written.send_replace(self.upto);
    }
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!("sha256={}", crate::artifacts::hex(ring::hmac::sign(&key, body).as_ref()))
}

/// Delivers the outbox's changes to the hooks until `shutdown`.
pub async fn run(hooks: Vec<Webhook>, outbox: Outbox, mut shutdown: watch::Receiver<bool>) {
    let keys: Vec<String> = hooks.iter().map(Webhook::key).collect();
    if let Err(e) = forget_other_hooks(&outbox.store, &keys) {
        tracing::warn!(target: "agora::webhooks", error = %e, "cannot drop the places of hooks no longer configured");
    }
    if hooks.is_empty() {
        // nothing is kept for hooks that are gone (the newest change keeps the count)
        if let Err(e) = outbox.prune(&keys) {
            tracing::warn!(target: "agora::webhooks", error = %e, "cannot prune the outbox");
        }
        return;
    }
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap_or_default();
    for hook in hooks {
        let next = match outbox.store.get::<WebhookCursors>(&hook.key()) {
            Ok(Some(next)) => next,
            Ok(None) => outbox.last() + 1,
            Err(e) => {
                tracing::error!(target: "agora::webhooks", url = %hook.url, error = %e, "cannot read the hook's place in the outbox; not delivering to it");
                continue;
            }
        };
        let status = HookStatus {
            url: hook.url.clone(),
            events: hook.events.clone(),
            signed: hook.secret.is_some(),
            next_seq: next,
            behind: 0,
            delivered: 0,
            failed: 0,
            last: None,
            retrying: None,
        };
        outbox.hooks.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(hook.key(), status);
        tokio::spawn(deliver_all(http.clone(), hook, next, outbox.clone(), shutdown.clone()));
    }
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    loop {
        tokio::select! {
            _ = prune.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        if let Err(e) = outbox.prune(&keys) {
            tracing::warn!(target: "agora::webhooks", error = %e, "cannot prune the outbox");
        }
    }
}

/// Deletes the places of hooks that are no longer configured, so the outbox is not kept for them.
fn forget_other_hooks(store: &Store, keys: &[String]) -> Result<(), StoreError> {
    let mut batch = store.batch();
    for item in store.iter::<WebhookCursors>() {
        let key = String::from_utf8_lossy(&item?.0).into_owned();
        if !keys.contains(&key) {
            batch.delete::<WebhookCursors>(&key);
        }
    }
    store.write(batch)
}

/// One hook's deliveries, in order, from sequence number `next` on; its place is kept after
/// each change, delivered, given up or not asked for.
async fn deliver_all(
    http: reqwest::Client,
    hook: Webhook,
    mut next: u64,
    outbox: Outbox,
    mut shutdown: watch::Receiver<bool>,
) {
    let key = hook.key();
    let mut written = outbox.written.subscribe();
    loop {
        let pending = match outbox.read(next) {
            Ok(pending) => pending,
            Err(e) => {
                tracing::error!(target: "agora::webhooks", url = %hook.url, error = %e, "cannot read the outbox; the hook stops");
                return;
            }
        };
        if pending.is_empty() {
            tokio::select! {
                changed = written.changed() => if changed.is_err() { return },
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            continue;
        }
        let mut kept = next;
        let keep = |next: u64| {
            if let Err(e) = outbox.store.put::<WebhookCursors>(&key, &next) {
                tracing::warn!(target: "agora::webhooks", url = %hook.url, error = %e, "cannot keep the hook's place in the outbox");
            }
            outbox.update(&key, |status| status.next_seq = next);
        };
        for (seq, event) in pending {
            if !hook.wants(&event.kind) {
                next = seq + 1; // kept with the next delivery or at the end of the batch
                continue;
            }
            match serde_json::to_vec(&Payload { seq, event: &event }) {
                Ok(body) => {
                    let retrying = |attempts: u32, error: String| {
                        outbox.update(&key, |status| {
                            status.retrying = Some(Attempt {
                                seq,
                                kind: event.kind.clone(),
                                outcome: "retrying".into(),
                                attempts,
                                error: Some(error),
                                at_ms: super::now_ms(),
                            })
                        })
                    };
                    let Some((outcome, attempts, error)) =
                        deliver(&http, &hook, &event.kind, body.into(), &mut shutdown, retrying).await
                    else {
                        if next != kept {
                            keep(next);
                        }
                        return; // stopping: this change goes again at the next start
                    };
                    metrics::counter!("agora_webhook_deliveries_total", "outcome" => outcome).increment(1);
                    outbox.update(&key, |status| {
                        match outcome {
                            "delivered" => status.delivered += 1,
                            _ => status.failed += 1,
                        }
                        status.retrying = None;
                        let (kind, outcome, at_ms) = (event.kind.clone(), outcome.into(), super::now_ms());
                        status.last = Some(Attempt { seq, kind, outcome, attempts, error, at_ms });
                    });
                }
                Err(e) => {
                    tracing::warn!(target: "agora::webhooks", seq, error = %e, "cannot encode a registry change; not sent")
                }
            }
            next = seq + 1;
            keep(next); // a delivered change is not sent again after a restart
            kept = next;
        }
        if next != kept {
            keep(next);
        }
    }
}

/// Delivers one change, trying again after 1, 2, 4 and 8 s (each failed attempt told to
/// `retrying` with its number and error, when another follows): `delivered` or `failed`, with
/// the attempts made and the last one's error, or `None` when the node stops meanwhile.
async fn deliver(
    http: &reqwest::Client,
    hook: &Webhook,
    kind: &str,
    body: bytes::Bytes,
    shutdown: &mut watch::Receiver<bool>,
    retrying: impl Fn(u32, String),
) -> Option<(&'static str, u32, Option<String>)> {
    let signed = hook.secret.as_ref().map(|secret| signature(secret, &body));
    let mut wait = Duration::from_secs(1);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut request = http
            .post(&hook.url)
            .header("content-type", "application/json")
            .header("agora-event", kind)
            .body(body.clone());
        if let Some(signed) = &signed {
            request = request.header("agora-signature", signed);
        }
        let sent = tokio::select! {
            sent = request.send() => sent,
            _ = shutdown.wait_for(|stop| *stop) => return None,
        };
        let failure = match sent {
            Ok(response) if response.status().is_success() => return Some(("delivered", attempt, None)),
            Ok(response) => format!("it answered {}", response.status()),
            Err(e) => e.to_string(),
        };
        tracing::warn!(target: "agora::webhooks", url = %hook.url, kind, attempt, error = %failure, "webhook delivery failed");
        if attempt >= ATTEMPTS {
            return Some(("failed", attempt, Some(failure)));
        }
        retrying(attempt, failure);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|stop| *stop) => return None,
        }
        wait *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_are_checked_filter_kinds_and_sign_as_hmac_sha256() {
        let hook = Webhook { url: "https://ci.example/hook".into(), events: vec![], secret: None };
        hook.check().unwrap();
        assert!(hook.wants("version_created") && hook.wants("alias_set"));
        let only = Webhook { events: vec!["stage_changed".into()], ..hook.clone() };
        assert!(only.wants("stage_changed") && !only.wants("version_created"));
        for (bad, says) in [
            (Webhook { url: "ftp://x/y".into(), ..hook.clone() }, "http or https"),
            (Webhook { url: "not a url".into(), ..hook.clone() }, "not a URL"),
            (Webhook { secret: Some(String::new()), ..hook.clone() }, "secret"),
            (Webhook { events: vec![" ".into()], ..hook.clone() }, "empty name"),
        ] {
            assert!(bad.check().unwrap_err().contains(says), "{bad:?}");
        }
        // RFC 4231, test case 2
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    impl Outbox {
        fn push(&self, event: &RegistryEvent) -> Result<(), StoreError> {
            let mut batch = self.store.batch();
            let staged = self.stage(&mut batch, [event])?;
            self.store.write(batch)?;
            staged.written();
            Ok(())
        }
    }

    #[test]
    fn the_outbox_numbers_changes_keeps_its_count_across_restarts_and_prunes_what_every_hook_had() {
        let dir = tempfile::tempdir().unwrap();
        let event = |n: u32| RegistryEvent {
            kind: "version_created",
            model: "m".into(),
            version: Some(n),
            detail: String::new(),
            actor: "operator".into(),
        };
        let store = Store::open(&dir.path().join("db")).unwrap();
        let outbox = Outbox::open(store.clone()).unwrap();
        for n in 1..=5 {
            outbox.push(&event(n)).unwrap();
        }
        let read = outbox.read(2).unwrap();
        assert_eq!(
            read.iter().map(|(seq, e)| (*seq, e.version)).collect::<Vec<_>>(),
            [(2, Some(2)), (3, Some(3)), (4, Some(4)), (5, Some(5))]
        );
        // one hook has had up to 3 (its next is 4), another everything: 1 and 2 go
        let keys = ["a".to_owned(), "b".to_owned()];
        store.put::<WebhookCursors>(&keys[0], &4).unwrap();
        store.put::<WebhookCursors>(&keys[1], &6).unwrap();
        assert_eq!(outbox.prune(&keys).unwrap(), 2);
        assert_eq!(outbox.read(0).unwrap()[0].0, 3);
        // everything delivered: the newest stays, and the count goes on after a restart
        store.put::<WebhookCursors>(&keys[0], &6).unwrap();
        assert_eq!(outbox.prune(&keys).unwrap(), 2);
        assert_eq!(outbox.read(0).unwrap().iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), [5]);
        drop(outbox);
        let again = Outbox::open(store.clone()).unwrap();
        again.push(&event(6)).unwrap();
        let (seq, sixth) = again.read(6).unwrap().remove(0);
        assert_eq!((seq, sixth.version), (6, Some(6)));
        assert_eq!(again.last(), 6);
        // every hook removed from the configuration: their places go, and all but the newest
        let (_stop, stopped) = watch::channel(true);
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(run(
            Vec::new(),
            again.clone(),
            stopped,
        ));
        assert_eq!(store.iter::<WebhookCursors>().count(), 0);
        assert_eq!(again.read(0).unwrap().iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), [6]);
    }
}
