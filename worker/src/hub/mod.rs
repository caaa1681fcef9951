//! Released weights and data sets by name, fetched when they are not cached: PaddleMIX's CoCa
//! weights (`paddlemix`), open_clip's on the Hugging Face hub (`hf`), the seed's COCO archive
//! (`coco`, `extract`); the downloader (`download`, `checksum`), the cache folders and URLs
//! (`env`), one downloader per node (`node_gate`) and the choice of starting weights
//! (`weights`).

pub mod checksum;
pub mod coco;
pub mod download;
pub mod env;
pub mod extract;
pub mod hf;
pub mod node_gate;
pub mod paddlemix;
pub mod source;
pub mod weights;

#[cfg(test)]
mod test_server;
#[cfg(test)]
mod tests;

pub use download::{Downloader, Expected};
pub use env::HubEnv;
pub use node_gate::NodeGate;

/// Everything a fetch needs: the settings, the downloader and who downloads on this node.
#[derive(Clone)]
pub struct Hub {
    /// Cache folders, URLs, offline mode.
    pub env: HubEnv,
    downloader: Downloader,
    /// One downloader per node.
    pub gate: NodeGate,
}

impl Hub {
    /// A hub with `env`'s settings and the default downloader.
    pub fn new(env: HubEnv, gate: NodeGate) -> Self {
        let downloader = Downloader::new(&env);
        Self {
            env,
            downloader,
            gate,
        }
    }

    /// The process's settings, fetching on every call (a process alone).
    pub fn from_env() -> Self {
        Self::new(HubEnv::from_env(), NodeGate::alone())
    }

    /// Replaces the downloader (tests shorten its back-off).
    pub fn with_downloader(mut self, downloader: Downloader) -> Self {
        self.downloader = downloader;
        self
    }

    /// The downloader; with `may_download` false, one that requests nothing (a rank whose
    /// node's downloader has already fetched).
    pub fn downloader(&self, may_download: bool) -> Downloader {
        if may_download {
            self.downloader.clone()
        } else {
            self.downloader.clone().without_network()
        }
    }
}
