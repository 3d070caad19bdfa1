//! The swarm: one task owns the libp2p `Swarm` and everything else talks to it through a
//! [`Net`] handle (a command channel) and a stream of [`NetEvent`]s. This layer moves bytes
//! and knows nothing of orders or blobs; what arrives is judged by the layer above
//! (`p2p::Market`), which reports each gossip message's verdict back so gossipsub forwards
//! only valid messages and scores down the peers that send invalid ones.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context;
use futures::{StreamExt, stream::FuturesUnordered};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, SwarmBuilder, connection_limits, gossipsub, identify, identity, kad,
    mdns, noise, ping, request_response,
    swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle},
    tcp, yamux,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use super::wire::{BlobRequest, BlobResponse, JobMessage, JobReply, OrdersPage, OrdersRequest};

/// The gossip topics, as the issue names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Topic {
    Orders,
    Roots,
    Offers,
}

impl Topic {
    pub const ALL: [Topic; 3] = [Topic::Orders, Topic::Roots, Topic::Offers];

    pub fn name(self) -> &'static str {
        match self {
            Topic::Orders => "agora/orders/1",
            Topic::Roots => "agora/roots/1",
            Topic::Offers => "agora/offers/1",
        }
    }

    fn hash(self) -> gossipsub::TopicHash {
        gossipsub::IdentTopic::new(self.name()).hash()
    }

    fn from_hash(hash: &gossipsub::TopicHash) -> Option<Topic> {
        Topic::ALL.into_iter().find(|t| &t.hash() == hash)
    }
}

pub const ORDERS_PROTOCOL: StreamProtocol = StreamProtocol::new("/agora/orders/1");
/// Training jobs between a buyer's node and a provider's: start, progress, result, statement.
pub const JOBS_PROTOCOL: StreamProtocol = StreamProtocol::new("/agora/jobs/1");
pub const BLOB_PROTOCOL: StreamProtocol = StreamProtocol::new("/agora/blob/2");
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/agora/kad/1");
const AGENT: &str = concat!("agora/", env!("CARGO_PKG_VERSION"));

/// What the swarm listens on and whom it dials.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub mdns: bool,
    pub max_connections: u32,
    pub max_per_peer: u32,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    gossipsub: gossipsub::Behaviour,
    orders: request_response::cbor::Behaviour<OrdersRequest, OrdersPage>,
    jobs: request_response::cbor::Behaviour<JobMessage, JobReply>,
    blob: request_response::Behaviour<super::wire::BlobCodec>,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

/// Something a peer sent that the layer above must judge or answer.
#[derive(Debug)]
pub enum NetEvent {
    Gossip {
        topic: Topic,
        /// The peer that published it (gossipsub checked its signature over the message).
        author: Option<PeerId>,
        /// The peer that forwarded it to us.
        from: PeerId,
        id: gossipsub::MessageId,
        data: Vec<u8>,
    },
    OrdersRequest {
        peer: PeerId,
        request: OrdersRequest,
        reply: oneshot::Sender<OrdersPage>,
    },
    BlobRequest {
        peer: PeerId,
        request: BlobRequest,
        reply: oneshot::Sender<BlobResponse>,
    },
    JobMessage {
        peer: PeerId,
        message: JobMessage,
        reply: oneshot::Sender<JobReply>,
    },
    /// The first connection to a peer opened.
    Connected(PeerId),
    /// A peer subscribed to one of our topics (time to tell it what it missed).
    Subscribed {
        peer: PeerId,
        topic: Topic,
    },
}

/// A peer as `GET /api/v1/p2p/peers` shows it.
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
pub struct PeerInfo {
    pub peer_id: String,
    pub addresses: Vec<String>,
    pub agent: Option<String>,
    pub latency_ms: Option<f64>,
    /// Gossipsub's score of the peer (negative after invalid messages).
    pub score: Option<f64>,
    pub connected: bool,
}

/// What the swarm task publishes for readers (the API) without a round trip.
#[derive(Clone, Debug, Default)]
pub struct NetState {
    pub peer_id: String,
    pub listening: Vec<String>,
    pub peers: HashMap<PeerId, PeerInfo>,
    pub gossip_in: u64,
    pub gossip_out: u64,
    pub gossip_invalid: u64,
}

enum Command {
    Publish { topic: Topic, data: Vec<u8>, done: oneshot::Sender<Result<(), String>> },
    Report { id: gossipsub::MessageId, from: PeerId, verdict: gossipsub::MessageAcceptance },
    Orders { peer: PeerId, request: OrdersRequest, reply: oneshot::Sender<Result<OrdersPage, String>> },
    Job { peer: PeerId, message: JobMessage, reply: oneshot::Sender<Result<JobReply, String>> },
    Blob { peer: PeerId, request: BlobRequest, reply: oneshot::Sender<Result<BlobResponse, String>> },
    Provide { key: [u8; 32], on: bool },
    Providers { key: [u8; 32], reply: oneshot::Sender<HashSet<PeerId>> },
    Dial(Multiaddr),
}

/// A handle on the swarm task; cheap to clone.
#[derive(Clone)]
pub struct Net {
    pub peer_id: PeerId,
    commands: mpsc::Sender<Command>,
    state: Arc<RwLock<NetState>>,
}

impl Net {
    pub fn state(&self) -> NetState {
        self.state.read().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn connected_peers(&self) -> Vec<PeerId> {
        let state = self.state();
        state.peers.iter().filter(|(_, p)| p.connected).map(|(id, _)| *id).collect()
    }

    async fn send(&self, command: Command) -> anyhow::Result<()> {
        self.commands.send(command).await.map_err(|_| anyhow::anyhow!("the p2p swarm has stopped"))
    }

    pub async fn publish(&self, topic: Topic, data: Vec<u8>) -> anyhow::Result<()> {
        let (done, wait) = oneshot::channel();
        self.send(Command::Publish { topic, data, done }).await?;
        wait.await?.map_err(|e| anyhow::anyhow!("publishing on {}: {e}", topic.name()))
    }

    /// Tells gossipsub whether a received message was valid: accepted ones are forwarded,
    /// rejected ones penalise their sender.
    pub async fn report(
        &self,
        id: gossipsub::MessageId,
        from: PeerId,
        verdict: gossipsub::MessageAcceptance,
    ) {
        let _ = self.send(Command::Report { id, from, verdict }).await;
    }

    /// Sends a job message to a peer and waits for its reply.
    pub async fn send_job(&self, peer: PeerId, message: JobMessage) -> anyhow::Result<JobReply> {
        let (reply, wait) = oneshot::channel();
        self.send(Command::Job { peer, message, reply }).await?;
        wait.await?.map_err(|e| anyhow::anyhow!("job message to {peer}: {e}"))
    }

    pub async fn request_orders(&self, peer: PeerId, request: OrdersRequest) -> anyhow::Result<OrdersPage> {
        let (reply, wait) = oneshot::channel();
        self.send(Command::Orders { peer, request, reply }).await?;
        wait.await?.map_err(|e| anyhow::anyhow!("orders request to {peer}: {e}"))
    }

    pub async fn request_blob(&self, peer: PeerId, request: BlobRequest) -> anyhow::Result<BlobResponse> {
        let (reply, wait) = oneshot::channel();
        self.send(Command::Blob { peer, request, reply }).await?;
        wait.await?.map_err(|e| anyhow::anyhow!("blob request to {peer}: {e}"))
    }

    /// Announces (or withdraws) this node as a provider of a blob in the DHT.
    pub async fn provide(&self, key: [u8; 32], on: bool) -> anyhow::Result<()> {
        self.send(Command::Provide { key, on }).await
    }

    /// The peers the DHT names as providers of a blob.
    pub async fn providers(&self, key: [u8; 32]) -> anyhow::Result<HashSet<PeerId>> {
        let (reply, wait) = oneshot::channel();
        self.send(Command::Providers { key, reply }).await?;
        Ok(wait.await?)
    }

    pub async fn dial(&self, address: Multiaddr) -> anyhow::Result<()> {
        self.send(Command::Dial(address)).await
    }
}

/// The libp2p identity of a node: its ed25519 node key (the one that signs receipts).
pub fn keypair(secret: [u8; 32]) -> anyhow::Result<identity::Keypair> {
    let mut bytes = secret;
    identity::Keypair::ed25519_from_bytes(&mut bytes).context("the node key is not an ed25519 secret key")
}

/// Reads a `/p2p/<peer id>` suffix off an address.
pub fn peer_of(address: &Multiaddr) -> Option<PeerId> {
    address.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

fn gossip_config() -> anyhow::Result<gossipsub::Config> {
    gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_millis(700))
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        // Orders are content-addressed: the same order published by two nodes is one message.
        // Roots and offers are statements of their author: two nodes announcing the same root
        // are two messages.
        .message_id_fn(|m| {
            let mut hasher = blake3::Hasher::new();
            if m.topic != Topic::Orders.hash() {
                hasher.update(&m.source.map(|p| p.to_bytes()).unwrap_or_default());
                hasher.update(&m.sequence_number.unwrap_or_default().to_be_bytes());
            }
            hasher.update(&m.data);
            gossipsub::MessageId::from(hasher.finalize().as_bytes().to_vec())
        })
        .max_transmit_size(256 * 1024)
        .build()
        .map_err(|e| anyhow::anyhow!("gossipsub configuration: {e}"))
}

/// Scores that fall with invalid messages (P4) and do not punish a quiet market: the mesh
/// delivery penalties (P3, P3b) are off because listings are rare.
fn score_params() -> (gossipsub::PeerScoreParams, gossipsub::PeerScoreThresholds) {
    let mut params = gossipsub::PeerScoreParams::default();
    for topic in Topic::ALL {
        let t = gossipsub::TopicScoreParams {
            topic_weight: 1.0,
            time_in_mesh_weight: 0.01,
            time_in_mesh_quantum: Duration::from_secs(1),
            time_in_mesh_cap: 100.0,
            first_message_deliveries_weight: 1.0,
            first_message_deliveries_decay: 0.9,
            first_message_deliveries_cap: 50.0,
            mesh_message_deliveries_weight: 0.0,
            mesh_failure_penalty_weight: 0.0,
            invalid_message_deliveries_weight: -10.0,
            invalid_message_deliveries_decay: 0.99,
            ..Default::default()
        };
        params.topics.insert(topic.hash(), t);
    }
    // Many test nodes share 127.0.0.1: colocation must not count against them.
    params.ip_colocation_factor_weight = 0.0;
    let thresholds = gossipsub::PeerScoreThresholds {
        gossip_threshold: -20.0,
        publish_threshold: -40.0,
        graylist_threshold: -80.0,
        accept_px_threshold: 10.0,
        opportunistic_graft_threshold: 5.0,
    };
    (params, thresholds)
}

type Replies<T> = FuturesUnordered<
    std::pin::Pin<
        Box<dyn std::future::Future<Output = (request_response::ResponseChannel<T>, Option<T>)> + Send>,
    >,
>;

/// Starts the swarm task. Returns its handle, the stream of events, and the task.
pub fn start(
    key: identity::Keypair,
    config: NetConfig,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<(Net, mpsc::Receiver<NetEvent>, tokio::task::JoinHandle<()>)> {
    let peer_id = key.public().to_peer_id();
    let mdns_on = config.mdns;
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.max_connections))
        .with_max_established_per_peer(Some(config.max_per_peer));
    let mut swarm = SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .context("the p2p transport")?
        // QUIC (`/udp/…/quic-v1` addresses): TLS 1.3 and streams of its own, one handshake
        // round trip.
        .with_quic()
        .with_behaviour(|key| {
            let peer_id = key.public().to_peer_id();
            let mut gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip_config().map_err(|e| e.to_string())?,
            )?;
            let (params, thresholds) = score_params();
            gossipsub.with_peer_score(params, thresholds)?;
            let mut kad_config = kad::Config::new(KAD_PROTOCOL);
            kad_config.set_query_timeout(Duration::from_secs(10));
            let mut kad =
                kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
            // Nodes serve the DHT: without this kad stays a client until an external address
            // is confirmed, and peers' routing tables stay empty.
            kad.set_mode(Some(kad::Mode::Server));
            let rr = |protocol: StreamProtocol| {
                (
                    [(protocol, request_response::ProtocolSupport::Full)],
                    request_response::Config::default().with_request_timeout(Duration::from_secs(30)),
                )
            };
            let (orders_protocols, orders_config) = rr(ORDERS_PROTOCOL);
            let (blob_protocols, blob_config) = rr(BLOB_PROTOCOL);
            let (jobs_protocols, jobs_config) = rr(JOBS_PROTOCOL);
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)?)
            } else {
                None
            };
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                identify: identify::Behaviour::new(
                    identify::Config::new("/agora/1".into(), key.public()).with_agent_version(AGENT.into()),
                ),
                ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(5))),
                kad,
                gossipsub,
                orders: request_response::cbor::Behaviour::new(orders_protocols, orders_config),
                jobs: request_response::cbor::Behaviour::new(jobs_protocols, jobs_config),
                blob: request_response::Behaviour::with_codec(
                    super::wire::BlobCodec,
                    blob_protocols,
                    blob_config,
                ),
                mdns: Toggle::from(mdns),
            })
        })
        .map_err(|e| anyhow::anyhow!("the p2p behaviour: {e}"))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();

    for topic in Topic::ALL {
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&gossipsub::IdentTopic::new(topic.name()))
            .map_err(|e| anyhow::anyhow!("subscribing to {}: {e}", topic.name()))?;
    }
    for address in &config.listen {
        swarm.listen_on(address.clone()).with_context(|| format!("cannot listen on {address}"))?;
    }
    for address in &config.bootstrap {
        let Some(peer) = peer_of(address) else {
            anyhow::bail!("bootstrap address {address} has no /p2p/<peer id> suffix");
        };
        swarm.behaviour_mut().kad.add_address(&peer, address.clone());
        if let Err(e) = swarm.dial(address.clone()) {
            tracing::warn!(target: "agora::p2p", %address, error = %e, "cannot dial a bootstrap peer");
        }
    }

    let state = Arc::new(RwLock::new(NetState { peer_id: peer_id.to_string(), ..Default::default() }));
    let (commands, command_rx) = mpsc::channel(1024);
    let (events, event_rx) = mpsc::channel(4096);
    let net = Net { peer_id, commands, state: state.clone() };
    let task = tokio::spawn(SwarmTask::new(swarm, state, events).run(command_rx, shutdown));
    Ok((net, event_rx, task))
}

struct SwarmTask {
    swarm: libp2p::Swarm<Behaviour>,
    state: Arc<RwLock<NetState>>,
    events: mpsc::Sender<NetEvent>,
    orders_out: Waiting<OrdersPage>,
    jobs_out: Waiting<JobReply>,
    jobs_in: Replies<JobReply>,
    blob_out: Waiting<BlobResponse>,
    provider_queries: HashMap<kad::QueryId, (HashSet<PeerId>, oneshot::Sender<HashSet<PeerId>>)>,
    orders_in: Replies<OrdersPage>,
    blob_in: Replies<BlobResponse>,
}

impl SwarmTask {
    fn new(
        swarm: libp2p::Swarm<Behaviour>,
        state: Arc<RwLock<NetState>>,
        events: mpsc::Sender<NetEvent>,
    ) -> Self {
        Self {
            swarm,
            state,
            events,
            orders_out: HashMap::new(),
            jobs_out: HashMap::new(),
            jobs_in: FuturesUnordered::new(),
            blob_out: HashMap::new(),
            provider_queries: HashMap::new(),
            orders_in: FuturesUnordered::new(),
            blob_in: FuturesUnordered::new(),
        }
    }

    fn with_state(&self, f: impl FnOnce(&mut NetState)) {
        if let Ok(mut state) = self.state.write() {
            f(&mut state);
        }
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>, mut shutdown: watch::Receiver<bool>) {
        let mut scores = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { break }
                }
                Some(command) = commands.recv() => self.command(command),
                event = self.swarm.select_next_some() => self.event(event).await,
                Some((channel, page)) = self.orders_in.next(), if !self.orders_in.is_empty() => {
                    if let Some(page) = page {
                        let _ = self.swarm.behaviour_mut().orders.send_response(channel, page);
                    }
                }
                Some((channel, answer)) = self.blob_in.next(), if !self.blob_in.is_empty() => {
                    if let Some(answer) = answer {
                        let _ = self.swarm.behaviour_mut().blob.send_response(channel, answer);
                    }
                }
                Some((channel, answer)) = self.jobs_in.next(), if !self.jobs_in.is_empty() => {
                    if let Some(answer) = answer {
                        let _ = self.swarm.behaviour_mut().jobs.send_response(channel, answer);
                    }
                }
                _ = scores.tick() => self.refresh_scores(),
            }
        }
        tracing::info!(target: "agora::p2p", "swarm stopped");
    }

    fn refresh_scores(&mut self) {
        let gossip = &self.swarm.behaviour().gossipsub;
        let scores: Vec<(PeerId, Option<f64>)> = self
            .state
            .read()
            .map(|s| s.peers.keys().map(|p| (*p, gossip.peer_score(p))).collect())
            .unwrap_or_default();
        let connected: HashSet<PeerId> = self.swarm.connected_peers().copied().collect();
        self.with_state(|s| {
            for (peer, score) in scores {
                if let Some(info) = s.peers.get_mut(&peer) {
                    info.score = score;
                    info.connected = connected.contains(&peer);
                }
            }
        });
        metrics::gauge!("agora_p2p_peers").set(connected.len() as f64);
    }

    fn command(&mut self, command: Command) {
        let b = self.swarm.behaviour_mut();
        match command {
            Command::Publish { topic, data, done } => {
                let len = data.len();
                let result = match b.gossipsub.publish(gossipsub::IdentTopic::new(topic.name()), data) {
                    Ok(_) => Ok(()),
                    // Nobody to send to yet: the message is kept locally and reaches peers by
                    // catch-up when they connect.
                    Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => Ok(()),
                    Err(gossipsub::PublishError::Duplicate) => Ok(()),
                    Err(e) => Err(e.to_string()),
                };
                if result.is_ok() {
                    metrics::counter!("agora_p2p_gossip_messages_total", "direction" => "out").increment(1);
                    metrics::counter!("agora_p2p_bytes_total", "direction" => "out").increment(len as u64);
                    self.with_state(|s| s.gossip_out += 1);
                }
                let _ = done.send(result);
            }
            Command::Report { id, from, verdict } => {
                b.gossipsub.report_message_validation_result(&id, &from, verdict);
                if matches!(verdict, gossipsub::MessageAcceptance::Reject) {
                    metrics::counter!("agora_p2p_gossip_messages_total", "direction" => "invalid")
                        .increment(1);
                    self.with_state(|s| s.gossip_invalid += 1);
                }
            }
            Command::Orders { peer, request, reply } => {
                let id = b.orders.send_request(&peer, request);
                self.orders_out.insert(id, reply);
            }
            Command::Job { peer, message, reply } => {
                let id = b.jobs.send_request(&peer, message);
                self.jobs_out.insert(id, reply);
            }
            Command::Blob { peer, request, reply } => {
                let id = b.blob.send_request(&peer, request);
                self.blob_out.insert(id, reply);
            }
            Command::Provide { key, on } => {
                let key = kad::RecordKey::new(&key);
                if on {
                    if let Err(e) = b.kad.start_providing(key) {
                        tracing::warn!(target: "agora::p2p", error = %e, "cannot announce a blob");
                    }
                } else {
                    b.kad.stop_providing(&key);
                }
            }
            Command::Providers { key, reply } => {
                let id = b.kad.get_providers(kad::RecordKey::new(&key));
                self.provider_queries.insert(id, (HashSet::new(), reply));
            }
            Command::Dial(address) => {
                if let Some(peer) = peer_of(&address) {
                    b.kad.add_address(&peer, address.clone());
                }
                if let Err(e) = self.swarm.dial(address.clone()) {
                    tracing::warn!(target: "agora::p2p", %address, error = %e, "dial failed");
                }
            }
        }
    }

    async fn emit(&mut self, event: NetEvent) {
        let _ = self.events.send(event).await;
    }

    async fn event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let full =
                    address.clone().with(libp2p::multiaddr::Protocol::P2p(*self.swarm.local_peer_id()));
                tracing::info!(target: "agora::p2p", %full, "p2p listening");
                // A plain line for people and for tests that start nodes on port 0.
                println!("agora node: p2p listening on {full}");
                self.with_state(|s| s.listening.push(full.to_string()));
            }
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, num_established, .. } => {
                let address = endpoint.get_remote_address().clone();
                if endpoint.is_dialer() {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, address.clone());
                }
                self.with_state(|s| {
                    let info = s
                        .peers
                        .entry(peer_id)
                        .or_insert_with(|| PeerInfo { peer_id: peer_id.to_string(), ..Default::default() });
                    info.connected = true;
                    if !info.addresses.contains(&address.to_string()) {
                        info.addresses.push(address.to_string());
                    }
                });
                if num_established.get() == 1 {
                    tracing::info!(target: "agora::p2p", peer = %peer_id, %address, "peer connected");
                    self.emit(NetEvent::Connected(peer_id)).await;
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                tracing::info!(target: "agora::p2p", peer = %peer_id, "peer disconnected");
                self.with_state(|s| {
                    if let Some(info) = s.peers.get_mut(&peer_id) {
                        info.connected = false;
                    }
                });
            }
            SwarmEvent::Behaviour(event) => self.behaviour_event(event).await,
            _ => {}
        }
    }

    async fn behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                for address in &info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, address.clone());
                }
                self.with_state(|s| {
                    if let Some(p) = s.peers.get_mut(&peer_id) {
                        p.agent = Some(info.agent_version.clone());
                        p.addresses = info.listen_addrs.iter().map(|a| a.to_string()).collect();
                    }
                });
            }
            BehaviourEvent::Ping(ping::Event { peer, result: Ok(rtt), .. }) => {
                self.with_state(|s| {
                    if let Some(p) = s.peers.get_mut(&peer) {
                        p.latency_ms = Some(rtt.as_secs_f64() * 1e3);
                    }
                });
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                let Some(topic) = Topic::from_hash(&message.topic) else {
                    let b = self.swarm.behaviour_mut();
                    b.gossipsub.report_message_validation_result(
                        &message_id,
                        &propagation_source,
                        gossipsub::MessageAcceptance::Ignore,
                    );
                    return;
                };
                metrics::counter!("agora_p2p_gossip_messages_total", "direction" => "in").increment(1);
                metrics::counter!("agora_p2p_bytes_total", "direction" => "in")
                    .increment(message.data.len() as u64);
                self.with_state(|s| s.gossip_in += 1);
                self.emit(NetEvent::Gossip {
                    topic,
                    author: message.source,
                    from: propagation_source,
                    id: message_id,
                    data: message.data,
                })
                .await;
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic }) => {
                if let Some(topic) = Topic::from_hash(&topic) {
                    self.emit(NetEvent::Subscribed { peer: peer_id, topic }).await;
                }
            }
            BehaviourEvent::Jobs(event) => {
                if let Some((peer, message, channel)) = route(event, &mut self.jobs_out) {
                    let (reply, wait) = oneshot::channel();
                    self.jobs_in.push(Box::pin(async move { (channel, wait.await.ok()) }));
                    self.emit(NetEvent::JobMessage { peer, message, reply }).await;
                }
            }
            BehaviourEvent::Orders(event) => {
                if let Some((peer, request, channel)) = route(event, &mut self.orders_out) {
                    let (reply, wait) = oneshot::channel();
                    self.orders_in.push(Box::pin(async move { (channel, wait.await.ok()) }));
                    self.emit(NetEvent::OrdersRequest { peer, request, reply }).await;
                }
            }
            BehaviourEvent::Blob(event) => {
                if let Some((peer, request, channel)) = route(event, &mut self.blob_out) {
                    let (reply, wait) = oneshot::channel();
                    self.blob_in.push(Box::pin(async move { (channel, wait.await.ok()) }));
                    self.emit(NetEvent::BlobRequest { peer, request, reply }).await;
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(result),
                step,
                ..
            }) => {
                if let Some((found, _)) = self.provider_queries.get_mut(&id)
                    && let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = result
                {
                    found.extend(providers);
                }
                if step.last
                    && let Some((found, reply)) = self.provider_queries.remove(&id)
                {
                    let _ = reply.send(found);
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, address) in found {
                    self.swarm.behaviour_mut().kad.add_address(&peer, address.clone());
                    let _ = self.swarm.dial(address);
                }
            }
            _ => {}
        }
    }
}

type Waiting<T> = HashMap<request_response::OutboundRequestId, oneshot::Sender<Result<T, String>>>;

/// Hands a request-response event's answer or failure to the caller waiting for it; returns an
/// inbound request for the layer above to answer.
fn route<Req, Resp>(
    event: request_response::Event<Req, Resp>,
    waiting: &mut Waiting<Resp>,
) -> Option<(PeerId, Req, request_response::ResponseChannel<Resp>)> {
    match event {
        request_response::Event::Message { peer, message, .. } => match message {
            request_response::Message::Request { request, channel, .. } => Some((peer, request, channel)),
            request_response::Message::Response { request_id, response } => {
                if let Some(reply) = waiting.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
                None
            }
        },
        request_response::Event::OutboundFailure { request_id, error, .. } => {
            if let Some(reply) = waiting.remove(&request_id) {
                let _ = reply.send(Err(error.to_string()));
            }
            None
        }
        _ => None,
    }
}
