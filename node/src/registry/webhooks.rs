//! Webhooks: registry changes POSTed as JSON to the URLs `[[registry.webhooks]]` names, as
//! MLflow's registry webhooks do. Each hook has its own queue and task, so events reach it in
//! the order they happened and a slow or dead hook holds no other back. A delivery that fails
//! (no answer, or not 2xx) is tried again after 1, 2, 4 and 8 seconds, then dropped with a
//! warning and a metric.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};

use super::RegistryEvent;

/// Tries of one delivery.
pub const ATTEMPTS: u32 = 5;
/// Events waiting for one hook; beyond that they are dropped (and counted).
const QUEUE: usize = 1024;

/// An event's kind and its JSON body, on its way to one hook.
type Delivery = (&'static str, bytes::Bytes);

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
}

/// What a hook receives.
#[derive(Serialize)]
struct Payload<'a> {
    #[serde(flatten)]
    event: &'a RegistryEvent,
    /// When the node published it, unix milliseconds.
    time_ms: u64,
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!("sha256={}", crate::artifacts::hex(ring::hmac::sign(&key, body).as_ref()))
}

/// Sends the registry's events to the hooks until `shutdown`.
pub async fn run(
    hooks: Vec<Webhook>,
    mut events: broadcast::Receiver<RegistryEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    if hooks.is_empty() {
        return;
    }
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap_or_default();
    let queues: Vec<(Webhook, mpsc::Sender<Delivery>)> = hooks
        .into_iter()
        .map(|hook| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(deliver_all(http.clone(), hook.clone(), rx));
            (hook, tx)
        })
        .collect();
    loop {
        let event = tokio::select! {
            _ = shutdown.changed() => if *shutdown.borrow() { return } else { continue },
            event = events.recv() => event,
        };
        let event = match event {
            Ok(event) => event,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(target: "agora::webhooks", missed, "registry events came faster than webhooks took them; some were not sent");
                metrics::counter!("agora_webhook_deliveries_total", "outcome" => "dropped").increment(missed);
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let body = match serde_json::to_vec(&Payload { event: &event, time_ms: super::now_ms() }) {
            Ok(body) => bytes::Bytes::from(body),
            Err(e) => {
                tracing::warn!(target: "agora::webhooks", error = %e, "cannot encode a registry event");
                continue;
            }
        };
        for (hook, queue) in queues.iter().filter(|(hook, _)| hook.wants(event.kind)) {
            if queue.try_send((event.kind, body.clone())).is_err() {
                tracing::warn!(target: "agora::webhooks", url = %hook.url, kind = event.kind, "the hook's queue is full; event dropped");
                metrics::counter!("agora_webhook_deliveries_total", "outcome" => "dropped").increment(1);
            }
        }
    }
}

/// One hook's deliveries, in order.
async fn deliver_all(http: reqwest::Client, hook: Webhook, mut queue: mpsc::Receiver<Delivery>) {
    while let Some((kind, body)) = queue.recv().await {
        let signed = hook.secret.as_ref().map(|secret| signature(secret, &body));
        let mut wait = Duration::from_secs(1);
        let mut outcome = "failed";
        for attempt in 1..=ATTEMPTS {
            let mut request = http
                .post(&hook.url)
                .header("content-type", "application/json")
                .header("agora-event", kind)
                .body(body.clone());
            if let Some(signed) = &signed {
                request = request.header("agora-signature", signed);
            }
            let failure = match request.send().await {
                Ok(response) if response.status().is_success() => {
                    outcome = "delivered";
                    break;
                }
                Ok(response) => format!("it answered {}", response.status()),
                Err(e) => e.to_string(),
            };
            tracing::warn!(target: "agora::webhooks", url = %hook.url, kind, attempt, error = %failure, "webhook delivery failed");
            if attempt < ATTEMPTS {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
        metrics::counter!("agora_webhook_deliveries_total", "outcome" => outcome).increment(1);
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
}
