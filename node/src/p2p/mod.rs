//! The node among its peers: signed listings spread by gossip and by catch-up, index roots
//! compared between nodes, blobs exchanged by hash.
//!
//! Nodes never trust each other. An order that arrives is checked exactly as one posted to
//! the API is (EIP-712 signature, owner, nonce, not cancelled or expired) before it is kept or
//! forwarded; one that fails is rejected, which lowers its sender's gossipsub score. When the
//! local index may simply be behind (the order names a token or nonce the index has not seen
//! yet), the chain itself is asked: if the chain agrees with the order, it is held and kept
//! once the index catches up; if not, it is rejected.

pub mod blob;
pub mod net;
pub mod wire;

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agora_contracts::{Deployment, LicenseMarket, ModelRegistry};
use alloy::{primitives::B256, providers::DynProvider, sol_types::SolValue};
use libp2p::{PeerId, gossipsub::MessageAcceptance};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use self::{
    net::{Net, NetConfig, NetEvent, Topic},
    wire::{JobMessage, JobReply, OrdersPage, OrdersRequest, RootAnnouncement, SignedOffer, SignedOrder},
};
use crate::{
    artifacts::ArtifactStore,
    chain::indexer::IndexStatus,
    market::{
        MarketView,
        orders::{self, OrderError},
    },
    store::{Store, tables::Orders},
};

/// Most orders in one catch-up page, and most pages read from one peer.
const PAGE: u32 = 256;
const MAX_PAGES: usize = 1000;
/// How long an order the chain vouches for waits for the local index.
const HOLD: Duration = Duration::from_secs(600);
/// Own roots remembered, by block, for comparing with peers'.
const ROOTS_KEPT: usize = 1024;

#[derive(Clone, Debug)]
pub struct P2pConfig {
    pub net: NetConfig,
    /// Announce the index root at least every this many blocks (and when the chain is quiet).
    pub roots_every: u64,
}

/// A peer's latest root and how it compares with ours at the same block.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct PeerRoot {
    pub peer_id: String,
    pub block: u64,
    #[schema(value_type = String)]
    pub hash: B256,
    #[schema(value_type = String)]
    pub state_root: B256,
    /// `None` until this node has indexed the same block (or when the block hashes differ:
    /// then the two nodes see different chains, not different indexes).
    pub agrees: Option<bool>,
    pub received_ms: u64,
}

/// `GET /api/v1/p2p/status`.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct P2pStatus {
    pub peer_id: String,
    pub listening: Vec<String>,
    pub peers_connected: usize,
    pub gossip_in: u64,
    pub gossip_out: u64,
    pub gossip_invalid: u64,
    /// Orders the chain vouches for, waiting for the local index to catch up.
    pub orders_held: usize,
    pub orders_from_peers: u64,
    pub orders_rejected: u64,
    pub roots: Vec<PeerRoot>,
}

struct Held {
    order: SignedOrder,
    peer: PeerId,
    until: Instant,
}

#[derive(Default)]
struct Shared {
    own_roots: BTreeMap<u64, (B256, B256)>,
    peer_roots: HashMap<PeerId, PeerRoot>,
    held: Vec<Held>,
    orders_from_peers: u64,
    orders_rejected: u64,
    /// Where job messages go (the compute service, once it runs).
    jobs: Option<JobHandler>,
}

/// A job message from a peer, and where its reply goes.
pub type JobHandler = mpsc::Sender<(PeerId, JobMessage, tokio::sync::oneshot::Sender<JobReply>)>;

/// The node's handle on the network; cheap to clone.
#[derive(Clone)]
pub struct P2p {
    net: Net,
    store: Store,
    artifacts: ArtifactStore,
    deployment: Deployment,
    provider: DynProvider,
    /// Checks gossiped orders' signatures: keys, and contract wallets (ERC-1271).
    signers: crate::signers::Signers,
    index: watch::Receiver<IndexStatus>,
    part_dir: PathBuf,
    shared: Arc<Mutex<Shared>>,
}

enum Verdict {
    Accepted { new: bool },
    Rejected(String),
    Held,
    Ignored(String),
}

impl P2p {
    /// Starts the swarm and the tasks that serve it.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        key: [u8; 32],
        config: P2pConfig,
        store: Store,
        artifacts: ArtifactStore,
        deployment: Deployment,
        provider: DynProvider,
        signers: crate::signers::Signers,
        index: watch::Receiver<IndexStatus>,
        data_dir: &std::path::Path,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<(Self, tokio::task::JoinHandle<()>)> {
        let (net, events, swarm_task) = net::start(net::keypair(key)?, config.net, shutdown.clone())?;
        let p2p = Self {
            net,
            store,
            artifacts,
            deployment,
            signers,
            provider,
            index,
            part_dir: data_dir.join("tmp").join("p2p"),
            shared: Default::default(),
        };
        let events_task = tokio::spawn(p2p.clone().handle_events(events));
        let roots_task = tokio::spawn(p2p.clone().follow_index(config.roots_every.max(1), shutdown));
        let task = tokio::spawn(async move {
            let _ = swarm_task.await;
            events_task.abort();
            let _ = roots_task.await;
        });
        Ok((p2p, task))
    }

    pub fn net(&self) -> &Net {
        &self.net
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn status(&self) -> P2pStatus {
        let net = self.net.state();
        let shared = self.shared();
        let mut roots: Vec<PeerRoot> = shared.peer_roots.values().cloned().collect();
        roots.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        P2pStatus {
            peer_id: net.peer_id,
            listening: net.listening,
            peers_connected: net.peers.values().filter(|p| p.connected).count(),
            gossip_in: net.gossip_in,
            gossip_out: net.gossip_out,
            gossip_invalid: net.gossip_invalid,
            orders_held: shared.held.len(),
            orders_from_peers: shared.orders_from_peers,
            orders_rejected: shared.orders_rejected,
            roots,
        }
    }

    pub fn peers(&self) -> Vec<net::PeerInfo> {
        let mut peers: Vec<_> = self.net.state().peers.into_values().collect();
        peers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        peers
    }

    /// Peer ids whose latest root agrees, and disagrees, with this node's at the same block.
    pub fn root_agreement(&self) -> (Vec<String>, Vec<String>) {
        let shared = self.shared();
        let mut agreeing = Vec::new();
        let mut disagreeing = Vec::new();
        for root in shared.peer_roots.values() {
            match root.agrees {
                Some(true) => agreeing.push(root.peer_id.clone()),
                Some(false) => disagreeing.push(root.peer_id.clone()),
                None => {}
            }
        }
        agreeing.sort();
        disagreeing.sort();
        (agreeing, disagreeing)
    }

    /// Gossips an order this node accepted from its API.
    pub async fn publish_order(&self, order: Vec<u8>, signature: Vec<u8>) {
        let signed = SignedOrder::new(order, signature);
        if let Err(e) = self.net.publish(Topic::Orders, wire::encode(&signed)).await {
            tracing::warn!(target: "agora::p2p", error = %e, "cannot gossip an order; peers get it by catch-up");
        }
    }

    /// Routes job messages from peers to `handler`.
    pub fn set_job_handler(&self, handler: JobHandler) {
        self.shared().jobs = Some(handler);
    }

    /// Sends a job message to a peer.
    pub async fn send_job(&self, peer: PeerId, message: JobMessage) -> anyhow::Result<JobReply> {
        self.net.send_job(peer, message).await
    }

    /// Serves a blob to one peer only.
    pub async fn share_with(&self, hash: [u8; 32], peer: PeerId) -> Result<(), blob::ShareError> {
        let (store, artifacts) = (self.store.clone(), self.artifacts.clone());
        tokio::task::spawn_blocking(move || blob::share_with(&store, &artifacts, &hash, &peer))
            .await
            .map_err(|e| blob::ShareError::Io(std::io::Error::other(e)))??;
        Ok(())
    }

    /// Gossips a compute offer (already checked and kept by this node).
    pub async fn publish_offer(&self, offer: Vec<u8>, signature: Vec<u8>) {
        let signed = SignedOffer::new(offer, signature);
        if let Err(e) = self.net.publish(Topic::Offers, wire::encode(&signed)).await {
            tracing::debug!(target: "agora::p2p", error = %e, "cannot gossip an offer now; it goes out again when a peer subscribes");
        }
    }

    /// Checks a compute offer from a peer as the API would and keeps it.
    fn judge_offer(&self, signed: &SignedOffer, author: PeerId) -> MessageAcceptance {
        use crate::compute::offers::{self, OfferError};
        let Ok(now) = crate::compute::next_block_time(&self.store, &self.index.borrow()) else {
            return MessageAcceptance::Ignore;
        };
        match offers::accept(
            &self.store,
            &self.deployment,
            &signed.offer,
            &signed.signature,
            now,
            "peer",
            Some(author.to_string()),
        ) {
            Ok(_) => MessageAcceptance::Accept,
            Err(e @ (OfferError::Decode(_) | OfferError::Signature(_) | OfferError::Invalid(_))) => {
                tracing::warn!(target: "agora::p2p", %author, error = %e, "invalid offer gossiped; sender penalised");
                MessageAcceptance::Reject
            }
            // closed, stale, expired: the local index may be ahead of or behind the sender's
            Err(e) => {
                tracing::debug!(target: "agora::p2p", %author, error = %e, "gossiped offer ignored");
                MessageAcceptance::Ignore
            }
        }
    }

    /// Gossips again the live offers this node made or was given, for a peer that just joined.
    async fn republish_offers(&self) {
        let Ok(now) = crate::compute::next_block_time(&self.store, &self.index.borrow()) else { return };
        let Ok(live) = crate::compute::offers::live(&self.store, now) else { return };
        for offer in live.into_iter().filter(|o| o.source == "local") {
            self.publish_offer(alloy::sol_types::SolValue::abi_encode(&offer.offer), offer.signature).await;
        }
    }

    /// Shares a blob of the artifact store with peers and announces it in the DHT.
    pub async fn share(&self, hash: [u8; 32]) -> Result<crate::store::tables::SharedBlob, blob::ShareError> {
        let (store, artifacts) = (self.store.clone(), self.artifacts.clone());
        let shared = tokio::task::spawn_blocking(move || blob::share(&store, &artifacts, &hash))
            .await
            .map_err(|e| blob::ShareError::Io(std::io::Error::other(e)))??;
        let _ = self.net.provide(hash, true).await;
        Ok(shared)
    }

    /// Stops sharing a blob. Returns whether it was shared.
    pub async fn unshare(&self, hash: [u8; 32]) -> Result<bool, crate::store::StoreError> {
        let was = self.store.get::<crate::store::tables::SharedBlobs>(&hash)?.is_some();
        let mut batch = self.store.batch();
        batch.delete::<crate::store::tables::SharedBlobs>(&hash);
        self.store.write(batch)?;
        let _ = self.net.provide(hash, false).await;
        Ok(was)
    }

    /// Fetches a blob from peers into the artifact store.
    pub async fn fetch(&self, hash: [u8; 32]) -> Result<blob::FetchReport, blob::FetchError> {
        blob::fetch(&self.net, &self.artifacts, hash, &self.part_dir).await
    }

    async fn handle_events(self, mut events: mpsc::Receiver<NetEvent>) {
        // Announce what this node already shares (the DHT is in memory).
        for item in self.store.iter::<crate::store::tables::SharedBlobs>() {
            if let Ok((key, _)) = item
                && let Ok(hash) = <[u8; 32]>::try_from(key.as_slice())
            {
                let _ = self.net.provide(hash, true).await;
            }
        }
        while let Some(event) = events.recv().await {
            match event {
                NetEvent::Gossip { topic: Topic::Orders, author, from, id, data } => {
                    let this = self.clone();
                    tokio::spawn(async move {
                        let peer = author.unwrap_or(from);
                        let verdict = match wire::decode::<SignedOrder>(&data) {
                            Some(signed) => this.judge_or_hold(signed, peer).await,
                            None => this.rejected("not an encoded order".into()),
                        };
                        let acceptance = match verdict {
                            Verdict::Accepted { .. } => MessageAcceptance::Accept,
                            Verdict::Rejected(why) => {
                                tracing::warn!(target: "agora::p2p", %from, %why, "invalid order gossiped; sender penalised");
                                MessageAcceptance::Reject
                            }
                            Verdict::Held => MessageAcceptance::Ignore,
                            Verdict::Ignored(why) => {
                                tracing::debug!(target: "agora::p2p", %from, %why, "gossiped order ignored");
                                MessageAcceptance::Ignore
                            }
                        };
                        this.net.report(id, from, acceptance).await;
                    });
                }
                NetEvent::Gossip { topic: Topic::Roots, author, from, id, data } => {
                    let acceptance = match (author, wire::decode::<RootAnnouncement>(&data)) {
                        (Some(author), Some(root)) => {
                            self.peer_root(author, root);
                            MessageAcceptance::Accept
                        }
                        _ => MessageAcceptance::Reject,
                    };
                    self.net.report(id, from, acceptance).await;
                }
                NetEvent::Gossip { topic: Topic::Offers, author, from, id, data } => {
                    let this = self.clone();
                    tokio::spawn(async move {
                        let store_work = this.clone();
                        let acceptance =
                            tokio::task::spawn_blocking(move || match wire::decode::<SignedOffer>(&data) {
                                Some(signed) => store_work.judge_offer(&signed, author.unwrap_or(from)),
                                None => MessageAcceptance::Reject,
                            })
                            .await
                            .unwrap_or(MessageAcceptance::Ignore);
                        this.net.report(id, from, acceptance).await;
                    });
                }
                NetEvent::OrdersRequest { request, reply, .. } => {
                    let this = self.clone();
                    tokio::task::spawn_blocking(move || {
                        let _ = reply.send(this.orders_page(&request).unwrap_or_default());
                    });
                }
                NetEvent::BlobRequest { peer, request, reply } => {
                    let (store, artifacts) = (self.store.clone(), self.artifacts.clone());
                    tokio::task::spawn_blocking(move || {
                        let _ = reply.send(blob::serve(&store, &artifacts, &peer, request));
                    });
                }
                NetEvent::JobMessage { peer, message, reply } => {
                    let handler = self.shared().jobs.clone();
                    match handler {
                        Some(jobs) => {
                            if jobs.send((peer, message, reply)).await.is_err() {
                                tracing::warn!(target: "agora::p2p", %peer, "the job service stopped; a job message was dropped");
                            }
                        }
                        None => {
                            let _ = reply.send(JobReply::Refused("this node runs no compute jobs".into()));
                        }
                    }
                }
                NetEvent::Connected(peer) => {
                    tokio::spawn(self.clone().catch_up(peer));
                }
                NetEvent::Subscribed { topic: Topic::Roots, .. } => self.announce_root().await,
                NetEvent::Subscribed { topic: Topic::Offers, .. } => self.republish_offers().await,
                NetEvent::Subscribed { .. } => {}
            }
        }
    }

    /// Checks an order from a peer against the local index, as the API would, and keeps it
    /// when valid. Returns whether it was new.
    async fn keep(
        &self,
        order: &LicenseMarket::Order,
        signed: &SignedOrder,
        peer: PeerId,
    ) -> Result<bool, OrderError> {
        let (store, index, deployment, signers) =
            (self.store.clone(), self.index.borrow().clone(), self.deployment.clone(), self.signers.clone());
        let (order, signature, source) = (order.clone(), signed.signature.to_vec(), format!("peer:{peer}"));
        let (_, new) = tokio::task::spawn_blocking(move || {
            orders::accept_now(
                &store,
                &signers,
                index,
                &deployment,
                &order,
                &signature,
                orders::Source::Peer(&source),
            )
        })
        .await
        .map_err(|e| OrderError::Terms(format!("the check did not finish: {e}")))??;
        if new {
            self.shared().orders_from_peers += 1;
        }
        Ok(new)
    }

    /// Judges an order from a peer; keeps it when valid.
    async fn judge(&self, signed: SignedOrder, peer: PeerId) -> Verdict {
        let Ok(order) = LicenseMarket::Order::abi_decode(&signed.order) else {
            return self.rejected("not an ABI-encoded order".into());
        };
        match self.keep(&order, &signed, peer).await {
            Ok(new) => Verdict::Accepted { new },
            Err(e @ (OrderError::Signature(_) | OrderError::Terms(_) | OrderError::Cancelled)) => {
                self.rejected(e.to_string())
            }
            Err(e @ (OrderError::NotOwner(_) | OrderError::StaleNonce { .. })) => {
                match self.chain_vouches(&order).await {
                    Some(true) => Verdict::Held,
                    Some(false) => self.rejected(e.to_string()),
                    None => Verdict::Ignored(format!("{e}; the chain could not be asked")),
                }
            }
            // Expired on the way, or the store failed: no fault of the sender.
            Err(e) => Verdict::Ignored(e.to_string()),
        }
    }

    /// As [`Self::judge`], holding an order the chain vouches for until the index catches up.
    async fn judge_or_hold(&self, signed: SignedOrder, peer: PeerId) -> Verdict {
        let verdict = self.judge(signed.clone(), peer).await;
        if let Verdict::Held = verdict {
            self.shared().held.push(Held { order: signed, peer, until: Instant::now() + HOLD });
        }
        verdict
    }

    fn rejected(&self, why: String) -> Verdict {
        self.shared().orders_rejected += 1;
        Verdict::Rejected(why)
    }

    /// Whether the chain's latest state has the order's seller owning the token at the order's
    /// nonce (`None` when the chain cannot be asked).
    async fn chain_vouches(&self, order: &LicenseMarket::Order) -> Option<bool> {
        let registry = ModelRegistry::new(self.deployment.model_registry, self.provider.clone());
        let market = LicenseMarket::new(self.deployment.license_market, self.provider.clone());
        let owner = match registry.ownerOf(order.tokenId).call().await {
            Ok(owner) => owner,
            // A token that does not exist reverts: the order cannot be valid.
            Err(alloy::contract::Error::TransportError(e)) if e.as_error_resp().is_none() => return None,
            Err(_) => return Some(false),
        };
        let nonce = market.nonces(order.seller).call().await.ok()?;
        Some(owner == order.seller && nonce == order.nonce)
    }

    /// Checks held orders again now that the index moved (the chain already vouched for them:
    /// only the index is asked); drops those whose time ran out.
    async fn retry_held(&self) {
        let held = std::mem::take(&mut self.shared().held);
        for h in held {
            if h.until < Instant::now() {
                continue;
            }
            let Ok(order) = LicenseMarket::Order::abi_decode(&h.order.order) else { continue };
            match self.keep(&order, &h.order, h.peer).await {
                Ok(true) => {
                    // Spread it: peers that missed the first gossip get it now (duplicates are
                    // recognised by content).
                    let _ = self.net.publish(Topic::Orders, wire::encode(&h.order)).await;
                }
                Err(OrderError::NotOwner(_) | OrderError::StaleNonce { .. }) => self.shared().held.push(h),
                Ok(false) | Err(_) => {}
            }
        }
    }

    /// A page of the active orders, for a peer catching up.
    fn orders_page(&self, request: &OrdersRequest) -> Result<OrdersPage, crate::store::StoreError> {
        let limit = request.limit.clamp(1, PAGE) as usize;
        let market = MarketView::new(&self.store, self.index.borrow().clone());
        let now = market.chain_now()?;
        let start = request.after.map(|a| a.to_vec());
        let mut page = OrdersPage::default();
        if request.offers {
            let now = crate::compute::next_block_time(&self.store, &self.index.borrow())?;
            for item in self.store.scan::<crate::store::tables::Offers>(&[], start.as_deref(), false) {
                let (key, record) = item?;
                if Some(key.as_slice()) == start.as_deref() {
                    continue;
                }
                let Ok(offer) =
                    <agora_contracts::ComputeMarket::Offer as SolValue>::abi_decode(&record.offer)
                else {
                    continue;
                };
                let hash = B256::from_slice(&key);
                if crate::compute::offers::dead_reason(&self.store, &offer, hash, now)?.is_none() {
                    page.offers.push(SignedOffer::new(record.offer, record.signature));
                    if page.offers.len() == limit {
                        page.next = Some(hash.0);
                        break;
                    }
                }
            }
            return Ok(page);
        }
        for item in self.store.scan::<Orders>(&[], start.as_deref(), false) {
            let (key, record) = item?;
            if Some(key.as_slice()) == start.as_deref() {
                continue;
            }
            let hash = B256::from_slice(&key);
            if market.order(hash, now)?.is_some_and(|(_, dead)| dead.is_none()) {
                page.orders.push(SignedOrder::new(record.order, record.signature));
                if page.orders.len() == limit {
                    page.next = Some(hash.0);
                    break;
                }
            }
        }
        Ok(page)
    }

    /// Pulls a peer's active orders (a node that joins late, or reconnects, catches up).
    async fn catch_up(self, peer: PeerId) {
        let (mut kept, mut offers) = (0usize, 0usize);
        for wants_offers in [false, true] {
            let mut after = None;
            for _ in 0..MAX_PAGES {
                let request = OrdersRequest { after, limit: PAGE, offers: wants_offers };
                let page = match self.net.request_orders(peer, request).await {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::debug!(target: "agora::p2p", %peer, error = %e, "catch-up stopped");
                        return;
                    }
                };
                for signed in page.orders {
                    if let Verdict::Accepted { new: true } = self.judge_or_hold(signed, peer).await {
                        kept += 1;
                    }
                }
                if !page.offers.is_empty() {
                    let this = self.clone();
                    offers += tokio::task::spawn_blocking(move || {
                        page.offers
                            .iter()
                            .filter(|o| this.judge_offer(o, peer) == MessageAcceptance::Accept)
                            .count()
                    })
                    .await
                    .unwrap_or(0);
                }
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
        }
        if kept + offers > 0 {
            tracing::info!(target: "agora::p2p", %peer, orders = kept, offers, "caught up");
        }
    }

    fn peer_root(&self, peer: PeerId, root: RootAnnouncement) {
        let mut shared = self.shared();
        let agrees = compare(&shared.own_roots, &root);
        if agrees == Some(false) {
            note_disagreement(&peer, &root, &shared.own_roots);
        }
        shared.peer_roots.insert(
            peer,
            PeerRoot {
                peer_id: peer.to_string(),
                block: root.block,
                hash: B256::from(root.hash),
                state_root: B256::from(root.state_root),
                agrees,
                received_ms: crate::registry::now_ms(),
            },
        );
    }

    async fn announce_root(&self) {
        let status = self.index.borrow().clone();
        let (Some(block), Some(hash)) = (status.indexed_block, status.indexed_hash) else { return };
        let root = RootAnnouncement { block, hash: hash.0, state_root: status.state_root.0 };
        let _ = self.net.publish(Topic::Roots, wire::encode(&root)).await;
    }

    /// Follows the local index: remembers its roots, compares peers' roots, retries held
    /// orders, and announces the root every `every` blocks and whenever the chain goes quiet.
    async fn follow_index(self, every: u64, mut shutdown: watch::Receiver<bool>) {
        let mut index = self.index.clone();
        let current = index.borrow_and_update().clone();
        if let (Some(block), Some(hash)) = (current.indexed_block, current.indexed_hash) {
            self.own_root(block, hash, current.state_root);
        }
        let mut announced: Option<u64> = None;
        let mut last_change = Instant::now();
        let mut last_announce = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = shutdown.changed() => if *shutdown.borrow() { return },
                changed = index.changed() => {
                    if changed.is_err() { return }
                    let status = index.borrow_and_update().clone();
                    if let (Some(block), Some(hash)) = (status.indexed_block, status.indexed_hash) {
                        self.own_root(block, hash, status.state_root);
                        last_change = Instant::now();
                        if announced.is_none_or(|a| block >= a + every || block < a) {
                            self.announce_root().await;
                            announced = Some(block);
                            last_announce = Instant::now();
                        }
                    }
                    self.retry_held().await;
                }
                _ = tick.tick() => {
                    let block = self.index.borrow().indexed_block;
                    let quiet = last_change.elapsed() > Duration::from_secs(1) && announced != block;
                    if quiet || last_announce.elapsed() > Duration::from_secs(10) {
                        self.announce_root().await;
                        announced = block;
                        last_announce = Instant::now();
                    }
                    self.shared().held.retain(|h| h.until >= Instant::now());
                }
            }
        }
    }

    fn own_root(&self, block: u64, hash: B256, root: B256) {
        let mut shared = self.shared();
        // A rollback replaces the roots of the undone blocks.
        shared.own_roots.retain(|b, _| *b < block);
        shared.own_roots.insert(block, (hash, root));
        while shared.own_roots.len() > ROOTS_KEPT {
            shared.own_roots.pop_first();
        }
        let Shared { own_roots, peer_roots, .. } = &mut *shared;
        for (peer, pr) in peer_roots.iter_mut() {
            let announcement =
                RootAnnouncement { block: pr.block, hash: pr.hash.0, state_root: pr.state_root.0 };
            let agrees = compare(own_roots, &announcement);
            if agrees == Some(false) && pr.agrees != Some(false) {
                note_disagreement(peer, &announcement, own_roots);
            }
            pr.agrees = agrees;
        }
    }
}

fn compare(own: &BTreeMap<u64, (B256, B256)>, root: &RootAnnouncement) -> Option<bool> {
    let (hash, state_root) = own.get(&root.block)?;
    if hash.0 != root.hash {
        return None;
    }
    Some(state_root.0 == root.state_root)
}

fn note_disagreement(peer: &PeerId, root: &RootAnnouncement, own: &BTreeMap<u64, (B256, B256)>) {
    metrics::counter!("agora_p2p_root_disagreements_total").increment(1);
    tracing::warn!(
        target: "agora::p2p",
        %peer,
        block = root.block,
        theirs = %B256::from(root.state_root),
        ours = ?own.get(&root.block).map(|(_, r)| *r),
        "a peer's index root disagrees with ours at the same block"
    );
}
