//! Pod names from the container runtime, over the CRI API (`runtime.v1.RuntimeService`, the
//! gRPC service kubelet drives containerd and CRI-O with) on its unix socket. The kernel's
//! events name a network namespace by inode, and a cgroup path names a pod by UID at best:
//! the runtime knows which sandbox owns which namespace and what the pod is called.
//!
//! The messages are the subset of k8s.io/cri-api's `pkg/apis/runtime/v1/api.proto` this
//! module reads or sends, written by hand as prost structs with the proto's own field numbers
//! (protobuf skips fields a reader does not declare, so a subset is wire-compatible, and no
//! `protoc` is needed to build). To add a field, copy its number and type from that file.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    future::Future,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use http::uri::{PathAndQuery, Uri};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use tonic::{body::Body, client::Grpc};

/// containerd's socket, where kubelet finds it by default; CRI-O's is
/// `/var/run/crio/crio.sock` (`--cri-socket`).
pub const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";

/// One call's limit: a runtime that hangs must not hold the owner scanner for long.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// The runtime.v1 messages used here (field numbers as in api.proto).
pub mod api {
    use std::collections::HashMap;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxMetadata {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub uid: String,
        #[prost(string, tag = "3")]
        pub namespace: String,
        #[prost(uint32, tag = "4")]
        pub attempt: u32,
    }

    /// `NamespaceMode`: POD = 0, CONTAINER = 1, NODE = 2, TARGET = 3.
    pub const NAMESPACE_MODE_NODE: i32 = 2;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NamespaceOption {
        #[prost(int32, tag = "1")]
        pub network: i32,
        #[prost(int32, tag = "2")]
        pub pid: i32,
        #[prost(int32, tag = "3")]
        pub ipc: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LinuxSandboxSecurityContext {
        #[prost(message, optional, tag = "1")]
        pub namespace_options: Option<NamespaceOption>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LinuxPodSandboxConfig {
        #[prost(string, tag = "1")]
        pub cgroup_parent: String,
        #[prost(message, optional, tag = "2")]
        pub security_context: Option<LinuxSandboxSecurityContext>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxConfig {
        #[prost(message, optional, tag = "1")]
        pub metadata: Option<PodSandboxMetadata>,
        #[prost(string, tag = "2")]
        pub hostname: String,
        #[prost(string, tag = "3")]
        pub log_directory: String,
        #[prost(map = "string, string", tag = "6")]
        pub labels: HashMap<String, String>,
        #[prost(message, optional, tag = "8")]
        pub linux: Option<LinuxPodSandboxConfig>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RunPodSandboxRequest {
        #[prost(message, optional, tag = "1")]
        pub config: Option<PodSandboxConfig>,
        #[prost(string, tag = "2")]
        pub runtime_handler: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RunPodSandboxResponse {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
    }

    /// StopPodSandboxRequest and RemovePodSandboxRequest alike.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxIdRequest {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Empty {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxStatusRequest {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
        #[prost(bool, tag = "2")]
        pub verbose: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Namespace {
        #[prost(message, optional, tag = "2")]
        pub options: Option<NamespaceOption>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LinuxPodSandboxStatus {
        #[prost(message, optional, tag = "1")]
        pub namespaces: Option<Namespace>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxStatus {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub metadata: Option<PodSandboxMetadata>,
        #[prost(int32, tag = "3")]
        pub state: i32,
        #[prost(message, optional, tag = "6")]
        pub linux: Option<LinuxPodSandboxStatus>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxStatusResponse {
        #[prost(message, optional, tag = "1")]
        pub status: Option<PodSandboxStatus>,
        /// With `verbose`: runtime-specific JSON by key; containerd and CRI-O put the
        /// sandbox's `pid` and OCI `runtimeSpec` under `info`.
        #[prost(map = "string, string", tag = "2")]
        pub info: HashMap<String, String>,
    }

    /// `PodSandboxState`: SANDBOX_READY = 0, SANDBOX_NOTREADY = 1.
    pub const SANDBOX_READY: i32 = 0;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxStateValue {
        #[prost(int32, tag = "1")]
        pub state: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxFilter {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub state: Option<PodSandboxStateValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListPodSandboxRequest {
        #[prost(message, optional, tag = "1")]
        pub filter: Option<PodSandboxFilter>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandbox {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub metadata: Option<PodSandboxMetadata>,
        #[prost(int32, tag = "3")]
        pub state: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListPodSandboxResponse {
        #[prost(message, repeated, tag = "1")]
        pub items: Vec<PodSandbox>,
    }

    /// `ContainerState`: CONTAINER_CREATED = 0, CONTAINER_RUNNING = 1, ...
    pub const CONTAINER_RUNNING: i32 = 1;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerStateValue {
        #[prost(int32, tag = "1")]
        pub state: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerFilter {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub state: Option<ContainerStateValue>,
        #[prost(string, tag = "3")]
        pub pod_sandbox_id: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListContainersRequest {
        #[prost(message, optional, tag = "1")]
        pub filter: Option<ContainerFilter>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerMetadata {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(uint32, tag = "2")]
        pub attempt: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Container {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub pod_sandbox_id: String,
        #[prost(message, optional, tag = "3")]
        pub metadata: Option<ContainerMetadata>,
        #[prost(int32, tag = "6")]
        pub state: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListContainersResponse {
        #[prost(message, repeated, tag = "1")]
        pub containers: Vec<Container>,
    }
}

/// One call's path: `/runtime.v1.RuntimeService/METHOD`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    ListPodSandbox,
    PodSandboxStatus,
    ListContainers,
    RunPodSandbox,
    StopPodSandbox,
    RemovePodSandbox,
}

impl Method {
    fn path(self) -> &'static str {
        match self {
            Method::ListPodSandbox => "/runtime.v1.RuntimeService/ListPodSandbox",
            Method::PodSandboxStatus => "/runtime.v1.RuntimeService/PodSandboxStatus",
            Method::ListContainers => "/runtime.v1.RuntimeService/ListContainers",
            Method::RunPodSandbox => "/runtime.v1.RuntimeService/RunPodSandbox",
            Method::StopPodSandbox => "/runtime.v1.RuntimeService/StopPodSandbox",
            Method::RemovePodSandbox => "/runtime.v1.RuntimeService/RemovePodSandbox",
        }
    }
}

/// hyper's HTTP/2 connection as the tower service tonic's client drives: tonic's own
/// transport (and its TCP, TLS and DNS stack) is left out of the build, a unix socket needs
/// none of it.
#[derive(Clone)]
struct Conn(http2::SendRequest<Body>);

impl tower_service::Service<http::Request<Body>> for Conn {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, hyper::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

/// A connection to a runtime's CRI socket.
pub struct Client {
    grpc: Grpc<Conn>,
}

impl Client {
    pub async fn connect(socket: &Path) -> Result<Client> {
        let stream = tokio::time::timeout(CALL_TIMEOUT, tokio::net::UnixStream::connect(socket))
            .await
            .map_err(|_| anyhow!("connecting timed out"))??;
        let (send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                log::debug!("CRI connection: {e}");
            }
        });
        // gRPC wants an authority; over a unix socket any name does.
        let grpc = Grpc::with_origin(Conn(send), Uri::from_static("http://localhost"));
        Ok(Client { grpc })
    }

    /// One unary call, within `CALL_TIMEOUT`.
    pub async fn call<Req, Resp>(&mut self, method: Method, req: Req) -> Result<Resp>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.call_within(method, req, CALL_TIMEOUT).await
    }

    /// One unary call, within `limit`.
    pub async fn call_within<Req, Resp>(
        &mut self,
        method: Method,
        req: Req,
        limit: Duration,
    ) -> Result<Resp>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let call = async {
            self.grpc
                .ready()
                .await
                .map_err(|e| anyhow!("connection: {e}"))?;
            let resp = self
                .grpc
                .unary(
                    tonic::Request::new(req),
                    PathAndQuery::from_static(method.path()),
                    tonic_prost::ProstCodec::<Req, Resp>::default(),
                )
                .await
                .map_err(|s| anyhow!("{}: {}", s.code(), s.message()))?;
            anyhow::Ok(resp.into_inner())
        };
        tokio::time::timeout(limit, call)
            .await
            .map_err(|_| anyhow!("{:?} timed out", method))?
            .with_context(|| format!("{method:?}"))
    }
}

/// One call on its own connection, for a caller without an async runtime (the VM suite
/// creating pods as kubelet would).
pub fn unary<Req, Resp>(socket: &Path, method: Method, req: Req, limit: Duration) -> Result<Resp>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async {
        let mut c = Client::connect(socket).await?;
        c.call_within(method, req, limit).await
    })
}

/// What the runtime says about the pod owning a network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub name: String,
    /// The Kubernetes namespace.
    pub namespace: String,
    pub uid: String,
    pub sandbox_id: String,
    /// Its running containers' names, sorted.
    pub containers: Vec<String>,
}

/// The part of a verbose PodSandboxStatus's `info` JSON that locates the sandbox.
#[derive(Deserialize)]
struct Info {
    #[serde(default)]
    pid: u32,
    #[serde(default, rename = "runtimeSpec")]
    runtime_spec: Option<Spec>,
}

#[derive(Deserialize)]
struct Spec {
    linux: Option<SpecLinux>,
}

#[derive(Deserialize)]
struct SpecLinux {
    #[serde(default)]
    namespaces: Vec<SpecNamespace>,
}

#[derive(Deserialize)]
struct SpecNamespace {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

/// Where a sandbox's network namespace can be opened, from its verbose status: the path the
/// runtime gave runc (containerd's and CRI-O's pinned `/var/run/netns/...`), else the
/// sandbox process's own. None for a pod on the node's network (hostNetwork), which would
/// otherwise name the node's namespace after one pod.
pub fn netns_path(status: &api::PodSandboxStatusResponse) -> Option<PathBuf> {
    let node = status
        .status
        .as_ref()
        .and_then(|s| s.linux.as_ref()?.namespaces.as_ref()?.options.as_ref())
        .is_some_and(|o| o.network == api::NAMESPACE_MODE_NODE);
    if node {
        return None;
    }
    let info: Info = serde_json::from_str(status.info.get("info")?).ok()?;
    let pinned = info
        .runtime_spec
        .and_then(|s| s.linux)
        .and_then(|l| l.namespaces.into_iter().find(|n| n.kind == "network"))
        .map(|n| n.path)
        .filter(|p| !p.is_empty());
    match pinned {
        Some(p) => Some(PathBuf::from(p)),
        None if info.pid > 0 => Some(PathBuf::from(format!("/proc/{}/ns/net", info.pid))),
        None => None,
    }
}

/// The inode of the network namespace at `path`, as events carry it.
fn inode(path: &Path) -> Option<u32> {
    u32::try_from(fs::metadata(path).ok()?.ino()).ok()
}

/// The runtime's pods by network namespace inode, kept between refreshes: a sandbox's
/// namespace never changes, so only sandboxes not seen before cost a status call.
pub struct Pods {
    socket: PathBuf,
    /// sandbox id → its namespace's inode (None: on the node's network, or not found).
    netns: HashMap<String, Option<u32>>,
    /// Whether a failure was already said on stderr.
    told: bool,
}

/// What one refresh found.
pub type ByNetns = HashMap<u32, Pod>;

impl Pods {
    pub fn new(socket: PathBuf) -> Pods {
        Pods {
            socket,
            netns: HashMap::new(),
            told: false,
        }
    }

    /// The runtime's pods now. A missing socket is a node without that runtime: nothing,
    /// silently. A socket that fails says so once on stderr; the pods are then unknown.
    pub fn refresh(&mut self) -> ByNetns {
        if !self.socket.exists() {
            return ByNetns::new();
        }
        match self.query() {
            Ok(pods) => pods,
            Err(e) => {
                if !self.told {
                    self.told = true;
                    eprintln!(
                        "conntrack-trace: CRI socket {}: {e:#}; pods are named from cgroups only",
                        self.socket.display()
                    );
                }
                ByNetns::new()
            }
        }
    }

    /// Like `refresh`, but a missing or failing socket is an error: for `--pod`, which means
    /// nothing without the runtime.
    pub fn require(&mut self) -> Result<ByNetns> {
        if !self.socket.exists() {
            bail!(
                "no CRI socket at {} (--cri-socket names another)",
                self.socket.display()
            );
        }
        self.query()
            .with_context(|| format!("CRI socket {}", self.socket.display()))
    }

    fn query(&mut self) -> Result<ByNetns> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .context("tokio runtime")?;
        rt.block_on(self.query_async())
    }

    async fn query_async(&mut self) -> Result<ByNetns> {
        let mut c = Client::connect(&self.socket).await?;
        let ready = api::ListPodSandboxRequest {
            filter: Some(api::PodSandboxFilter {
                id: String::new(),
                state: Some(api::PodSandboxStateValue {
                    state: api::SANDBOX_READY,
                }),
            }),
        };
        let sandboxes: api::ListPodSandboxResponse = c.call(Method::ListPodSandbox, ready).await?;
        let running = api::ListContainersRequest {
            filter: Some(api::ContainerFilter {
                state: Some(api::ContainerStateValue {
                    state: api::CONTAINER_RUNNING,
                }),
                ..Default::default()
            }),
        };
        let containers: api::ListContainersResponse =
            c.call(Method::ListContainers, running).await?;
        let mut names: HashMap<&str, Vec<String>> = HashMap::new();
        for ctr in &containers.containers {
            if let Some(m) = &ctr.metadata {
                names
                    .entry(ctr.pod_sandbox_id.as_str())
                    .or_default()
                    .push(m.name.clone());
            }
        }
        // Sandboxes gone since the last refresh are forgotten.
        self.netns
            .retain(|id, _| sandboxes.items.iter().any(|s| &s.id == id));
        let mut out = ByNetns::new();
        for s in &sandboxes.items {
            let Some(meta) = &s.metadata else { continue };
            let ino = match self.netns.get(&s.id) {
                Some(ino) => *ino,
                None => {
                    let req = api::PodSandboxStatusRequest {
                        pod_sandbox_id: s.id.clone(),
                        verbose: true,
                    };
                    let status: api::PodSandboxStatusResponse =
                        c.call(Method::PodSandboxStatus, req).await?;
                    let ino = netns_path(&status).and_then(|p| inode(&p));
                    self.netns.insert(s.id.clone(), ino);
                    ino
                }
            };
            let Some(ino) = ino else { continue };
            let mut containers = names.remove(s.id.as_str()).unwrap_or_default();
            containers.sort();
            out.insert(
                ino,
                Pod {
                    name: meta.name.clone(),
                    namespace: meta.namespace.clone(),
                    uid: meta.uid.clone(),
                    sandbox_id: s.id.clone(),
                    containers,
                },
            );
        }
        Ok(out)
    }
}

/// `--pod`/`--k8s-namespace`: the network namespaces of the pods matching both (an unset one
/// matches any), sorted; an error when none does, naming what there is.
pub fn select(pods: &ByNetns, name: Option<&str>, namespace: Option<&str>) -> Result<Vec<u32>> {
    let mut found: Vec<u32> = pods
        .iter()
        .filter(|(_, p)| name.is_none_or(|n| p.name == n))
        .filter(|(_, p)| namespace.is_none_or(|n| p.namespace == n))
        .map(|(&i, _)| i)
        .collect();
    found.sort_unstable();
    if found.is_empty() {
        let mut known: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for p in pods.values() {
            known.entry(&p.namespace).or_default().push(&p.name);
        }
        let what = match (name, namespace) {
            (Some(n), Some(ns)) => format!("no pod {n:?} in namespace {ns:?}"),
            (Some(n), None) => format!("no pod {n:?}"),
            (None, Some(ns)) => format!("no pod in namespace {ns:?}"),
            (None, None) => "no pod".into(),
        };
        let there: Vec<String> = known
            .iter()
            .map(|(ns, names)| format!("{ns}: {}", names.join(" ")))
            .collect();
        if there.is_empty() {
            bail!("{what} with its own network namespace: the runtime runs none");
        }
        bail!(
            "{what} with its own network namespace; the runtime's pods: {}",
            there.join("; ")
        );
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    fn status(info: &str, network: i32) -> api::PodSandboxStatusResponse {
        api::PodSandboxStatusResponse {
            status: Some(api::PodSandboxStatus {
                id: "s".into(),
                metadata: None,
                state: 0,
                linux: Some(api::LinuxPodSandboxStatus {
                    namespaces: Some(api::Namespace {
                        options: Some(api::NamespaceOption {
                            network,
                            pid: 1,
                            ipc: 0,
                        }),
                    }),
                }),
            }),
            info: [("info".to_string(), info.to_string())].into(),
        }
    }

    #[test]
    fn netns_from_verbose_status() {
        // containerd 1.6's shape, cut down.
        let pinned = r#"{"pid":812,"processStatus":"running","runtimeSpec":{"linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/var/run/netns/cni-5a0e"}]}}}"#;
        assert_eq!(
            netns_path(&status(pinned, 0)),
            Some(PathBuf::from("/var/run/netns/cni-5a0e"))
        );
        // No pinned path (the runtime made the namespace with the process): the process's.
        let unpinned = r#"{"pid":812,"runtimeSpec":{"linux":{"namespaces":[{"type":"network"}]}}}"#;
        assert_eq!(
            netns_path(&status(unpinned, 0)),
            Some(PathBuf::from("/proc/812/ns/net"))
        );
        // hostNetwork: the node's namespace is no pod's.
        assert_eq!(netns_path(&status(pinned, api::NAMESPACE_MODE_NODE)), None);
        assert_eq!(netns_path(&status("not json", 0)), None);
        assert_eq!(netns_path(&status("{}", 0)), None);
    }

    /// The field numbers are the wire format: a PodSandbox encoded by hand from api.proto's
    /// numbers (id = 1, metadata = 2 {name = 1, uid = 2, namespace = 3}, state = 3) decodes.
    #[test]
    fn wire_format_matches_api_proto() {
        let meta = [
            &[0x0a, 3][..],
            b"web",
            &[0x12, 1],
            b"u",
            &[0x1a, 7],
            b"default",
        ]
        .concat();
        let sandbox = [
            &[0x0a, 2][..],
            b"id",
            &[0x12, meta.len() as u8],
            &meta,
            &[0x18, 1],
            // A field this subset does not declare (created_at = 4) is skipped.
            &[0x20, 0x05],
        ]
        .concat();
        let list = [&[0x0a, sandbox.len() as u8][..], &sandbox].concat();
        let got = api::ListPodSandboxResponse::decode(&list[..]).unwrap();
        let s = &got.items[0];
        assert_eq!(s.id, "id");
        assert_eq!(s.state, 1);
        let m = s.metadata.as_ref().unwrap();
        assert_eq!((&*m.name, &*m.uid, &*m.namespace), ("web", "u", "default"));
    }

    #[test]
    fn selecting_pods() {
        let pod = |name: &str, ns: &str| Pod {
            name: name.into(),
            namespace: ns.into(),
            uid: String::new(),
            sandbox_id: String::new(),
            containers: Vec::new(),
        };
        let pods: ByNetns = [
            (10, pod("web", "default")),
            (11, pod("web", "shop")),
            (12, pod("db", "shop")),
        ]
        .into();
        assert_eq!(select(&pods, Some("web"), None).unwrap(), vec![10, 11]);
        assert_eq!(select(&pods, Some("web"), Some("shop")).unwrap(), vec![11]);
        assert_eq!(select(&pods, None, Some("shop")).unwrap(), vec![11, 12]);
        let e = select(&pods, Some("api"), None).unwrap_err().to_string();
        assert!(e.contains("no pod \"api\""), "{e}");
        assert!(e.contains("default: web"), "{e}");
        let e = select(&ByNetns::new(), None, Some("x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("runs none"), "{e}");
    }

    #[test]
    fn missing_socket_is_quiet_or_an_error() {
        let mut p = Pods::new(PathBuf::from("/nonexistent/cri.sock"));
        assert!(p.refresh().is_empty());
        assert!(!p.told);
        let e = p.require().unwrap_err().to_string();
        assert!(e.contains("no CRI socket at /nonexistent/cri.sock"), "{e}");
    }

    /// A socket nothing answers gRPC on: an error, said once by `refresh`.
    #[test]
    fn failing_socket() {
        let dir = std::env::temp_dir().join(format!("ct-cri-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // Accepts and closes at once: the HTTP/2 handshake fails.
        let t = std::thread::spawn(move || {
            for s in listener.incoming().take(2) {
                drop(s);
            }
        });
        let mut p = Pods::new(path.clone());
        assert!(p.require().is_err());
        assert!(p.refresh().is_empty());
        assert!(p.told);
        t.join().unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
