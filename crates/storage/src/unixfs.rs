//! The IPFS CIDv1 of a byte stream, exactly as kubo computes it with
//! `ipfs add --cid-version=1 --raw-leaves --chunker=size-262144` (the balanced layout).
//!
//! The stream is cut into 256 KiB chunks; each chunk is a raw leaf (codec `raw`, sha2-256).
//! One chunk (or none: the empty input) is its own CID. Otherwise the leaves are the bottom of
//! a balanced tree of dag-pb nodes with at most 174 links each: a node of height `h` covers an
//! aligned run of up to `174^h` leaves, the root has the smallest height that covers them all,
//! and a partial last subtree keeps its full height (a node with one child is kept).
//!
//! An inner node is a dag-pb `PBNode` in canonical form: its `Links` (field 2) before its
//! `Data` (field 1); each `PBLink` holds `Hash`, `Name` (present, empty) and `Tsize` (a leaf's
//! byte length; for an inner node its encoded size plus its children's `Tsize`). `Data` is a
//! UnixFS `Data { Type = File, filesize, blocksizes }` message (blocksizes not packed).
//!
//! The builder holds one open node per level (at most 174 links each), so memory stays small
//! whatever the input size.

use cid::Cid;
use cid::multihash::Multihash;
use sha2::{Digest, Sha256};

/// Bytes per leaf (`--chunker=size-262144`).
pub const CHUNK_SIZE: usize = 256 * 1024;
/// Links per inner node (kubo's default for the balanced layout).
pub const MAX_LINKS: usize = 174;

const RAW: u64 = 0x55;
const DAG_PB: u64 = 0x70;
const SHA2_256: u64 = 0x12;

fn cid_of(codec: u64, block: &[u8]) -> Cid {
    cid_from_digest(codec, &Sha256::digest(block))
}

fn cid_from_digest(codec: u64, digest: &[u8]) -> Cid {
    let mh = Multihash::<64>::wrap(SHA2_256, digest).expect("a sha2-256 digest fits in 64 bytes");
    Cid::new_v1(codec, mh)
}

/// A link to a finished child: its CID, its `Tsize` and the file bytes below it.
#[derive(Debug, Clone)]
struct Link {
    cid: Cid,
    tsize: u64,
    filesize: u64,
}

/// Computes the kubo CID of a stream fed in pieces of any size.
#[derive(Debug)]
pub struct CidBuilder {
    chunk: Sha256,
    chunk_len: usize,
    leaves: u64,
    /// `levels[0]` holds the links of the open height-1 node, `levels[1]` of the height-2 one...
    levels: Vec<Vec<Link>>,
    /// Inner nodes made so far, kept only when asked for (tests, a later IPFS upload).
    nodes: Option<Vec<(Cid, Vec<u8>)>>,
}

impl Default for CidBuilder {
    fn default() -> Self {
        CidBuilder::new()
    }
}

impl CidBuilder {
    pub fn new() -> CidBuilder {
        CidBuilder {
            chunk: Sha256::new(),
            chunk_len: 0,
            leaves: 0,
            levels: Vec::new(),
            nodes: None,
        }
    }

    /// A builder that also keeps every inner node block it makes ([`CidBuilder::finish_with_nodes`]).
    pub fn keeping_nodes() -> CidBuilder {
        CidBuilder {
            nodes: Some(Vec::new()),
            ..CidBuilder::new()
        }
    }

    /// Feeds the next bytes of the stream.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let take = (CHUNK_SIZE - self.chunk_len).min(data.len());
            self.chunk.update(&data[..take]);
            self.chunk_len += take;
            data = &data[take..];
            if self.chunk_len == CHUNK_SIZE {
                self.close_leaf();
            }
        }
    }

    fn close_leaf(&mut self) {
        let digest = std::mem::replace(&mut self.chunk, Sha256::new()).finalize();
        let len = self.chunk_len as u64;
        self.chunk_len = 0;
        self.leaves += 1;
        self.push(
            0,
            Link {
                cid: cid_from_digest(RAW, &digest),
                tsize: len,
                filesize: len,
            },
        );
    }

    /// Adds a child to the open node of `level`; a full node is closed first and moves up.
    fn push(&mut self, level: usize, link: Link) {
        if self.levels.len() == level {
            self.levels.push(Vec::with_capacity(MAX_LINKS));
        }
        if self.levels[level].len() == MAX_LINKS {
            let full = std::mem::take(&mut self.levels[level]);
            let parent = self.close_node(full);
            self.push(level + 1, parent);
        }
        self.levels[level].push(link);
    }

    fn close_node(&mut self, links: Vec<Link>) -> Link {
        let block = encode_node(&links);
        let cid = cid_of(DAG_PB, &block);
        let link = Link {
            cid,
            tsize: block.len() as u64 + links.iter().map(|l| l.tsize).sum::<u64>(),
            filesize: links.iter().map(|l| l.filesize).sum(),
        };
        if let Some(nodes) = &mut self.nodes {
            nodes.push((cid, block));
        }
        link
    }

    /// The CID of the whole stream.
    pub fn finish(self) -> Cid {
        self.finish_with_nodes().0
    }

    /// The CID of the whole stream and, for a builder made by [`CidBuilder::keeping_nodes`],
    /// every inner node block (CID, encoded bytes), root last.
    pub fn finish_with_nodes(mut self) -> (Cid, Vec<(Cid, Vec<u8>)>) {
        if self.chunk_len > 0 || self.leaves == 0 {
            self.close_leaf();
        }
        if self.leaves == 1 {
            let root = self.levels[0][0].cid;
            return (root, self.nodes.unwrap_or_default());
        }
        let mut level = 0;
        let root = loop {
            let links = std::mem::take(&mut self.levels[level]);
            let node = self.close_node(links);
            if level + 1 == self.levels.len() {
                break node.cid;
            }
            self.push(level + 1, node);
            level += 1;
        };
        (root, self.nodes.unwrap_or_default())
    }
}

/// The CID of a whole buffer.
pub fn cid_of_bytes(data: &[u8]) -> Cid {
    let mut b = CidBuilder::new();
    b.update(data);
    b.finish()
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_uint(out: &mut Vec<u8>, field: u64, v: u64) {
    put_varint(out, field << 3);
    put_varint(out, v);
}

/// The dag-pb block of an inner file node over `links`.
fn encode_node(links: &[Link]) -> Vec<u8> {
    // UnixFS Data { Type = File (2), filesize, blocksizes... }
    let mut data = Vec::with_capacity(16 + 10 * links.len());
    put_uint(&mut data, 1, 2);
    put_uint(&mut data, 3, links.iter().map(|l| l.filesize).sum());
    for l in links {
        put_uint(&mut data, 4, l.filesize);
    }
    let mut node = Vec::with_capacity(data.len() + 50 * links.len());
    let mut pb_link = Vec::with_capacity(64);
    for l in links {
        pb_link.clear();
        put_bytes(&mut pb_link, 1, &l.cid.to_bytes());
        put_bytes(&mut pb_link, 2, b"");
        put_uint(&mut pb_link, 3, l.tsize);
        put_bytes(&mut node, 2, &pb_link);
    }
    put_bytes(&mut node, 1, &data);
    node
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal protobuf reader for the checks below: (field, wire type, value or bytes).
    fn fields(mut b: &[u8]) -> Vec<(u64, u64, Vec<u8>, u64)> {
        fn varint(b: &mut &[u8]) -> u64 {
            let mut v = 0u64;
            let mut shift = 0;
            loop {
                let byte = b[0];
                *b = &b[1..];
                v |= u64::from(byte & 0x7f) << shift;
                if byte < 0x80 {
                    return v;
                }
                shift += 7;
            }
        }
        let mut out = Vec::new();
        while !b.is_empty() {
            let key = varint(&mut b);
            let (field, wt) = (key >> 3, key & 7);
            match wt {
                0 => {
                    let v = varint(&mut b);
                    out.push((field, wt, Vec::new(), v));
                }
                2 => {
                    let n = varint(&mut b) as usize;
                    out.push((field, wt, b[..n].to_vec(), 0));
                    b = &b[n..];
                }
                _ => panic!("unexpected wire type {wt}"),
            }
        }
        out
    }

    struct Decoded {
        links: Vec<(Cid, String, u64)>,
        filesize: u64,
        blocksizes: Vec<u64>,
    }

    fn decode(block: &[u8]) -> Decoded {
        let top = fields(block);
        // Canonical order: every link, then the data.
        let data_pos = top.iter().position(|f| f.0 == 1).expect("data present");
        assert_eq!(data_pos, top.len() - 1, "Data comes after the Links");
        let links = top[..data_pos]
            .iter()
            .map(|(field, wt, bytes, _)| {
                assert_eq!((*field, *wt), (2, 2));
                let l = fields(bytes);
                assert_eq!(
                    l.iter().map(|f| f.0).collect::<Vec<_>>(),
                    vec![1, 2, 3],
                    "Hash, Name, Tsize"
                );
                let cid = Cid::try_from(l[0].2.as_slice()).unwrap();
                (cid, String::from_utf8(l[1].2.clone()).unwrap(), l[2].3)
            })
            .collect();
        let data = fields(&top[data_pos].2);
        assert_eq!((data[0].0, data[0].3), (1, 2), "Type = File");
        assert_eq!(data[1].0, 3);
        let blocksizes = data[2..]
            .iter()
            .map(|f| {
                assert_eq!((f.0, f.1), (4, 0), "blocksizes not packed");
                f.3
            })
            .collect();
        Decoded {
            links,
            filesize: data[1].3,
            blocksizes,
        }
    }

    fn sample(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn build(data: &[u8], piece: usize) -> (Cid, Vec<(Cid, Vec<u8>)>) {
        let mut b = CidBuilder::keeping_nodes();
        for c in data.chunks(piece.max(1)) {
            b.update(c);
        }
        b.finish_with_nodes()
    }

    #[test]
    fn empty_input_is_the_empty_raw_leaf() {
        let (cid, nodes) = build(&[], 1);
        assert_eq!(
            cid.to_string(),
            "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
        );
        assert!(nodes.is_empty());
    }

    #[test]
    fn one_chunk_is_its_own_raw_leaf() {
        let one = cid_of_bytes(b"a");
        assert_eq!(one.codec(), RAW);
        assert_eq!(one, cid_of(RAW, b"a"));
        assert!(one.to_string().starts_with("bafkrei"));

        let full = sample(CHUNK_SIZE);
        let (cid, nodes) = build(&full, 10_000);
        assert_eq!(cid, cid_of(RAW, &full));
        assert!(nodes.is_empty());
    }

    #[test]
    fn one_chunk_and_a_byte_make_a_two_link_root() {
        let data = sample(CHUNK_SIZE + 1);
        let (cid, nodes) = build(&data, 4096);
        assert_eq!(nodes.len(), 1);
        let (root_cid, root) = &nodes[0];
        assert_eq!(*root_cid, cid);
        assert_eq!(cid.codec(), DAG_PB);
        assert!(cid.to_string().starts_with("bafybei"));
        assert_eq!(*root_cid, cid_of(DAG_PB, root));
        let d = decode(root);
        assert_eq!(d.filesize, CHUNK_SIZE as u64 + 1);
        assert_eq!(d.blocksizes, vec![CHUNK_SIZE as u64, 1]);
        assert_eq!(d.links.len(), 2);
        assert_eq!(d.links[0].0, cid_of(RAW, &data[..CHUNK_SIZE]));
        assert_eq!(d.links[1].0, cid_of(RAW, &data[CHUNK_SIZE..]));
        assert!(d.links.iter().all(|l| l.1.is_empty()));
        assert_eq!(d.links[0].2, CHUNK_SIZE as u64);
        assert_eq!(d.links[1].2, 1);
        // Same answer whatever the piece size.
        assert_eq!(build(&data, 1 << 20).0, cid);
        assert_eq!(build(&data, 777).0, cid);
    }

    #[test]
    fn a_stream_of_174_chunks_fits_one_node() {
        // Leaves are all the same content: the tree is about structure, not data.
        let mut b = CidBuilder::keeping_nodes();
        let chunk = sample(CHUNK_SIZE);
        for _ in 0..MAX_LINKS {
            b.update(&chunk);
        }
        let (cid, nodes) = b.finish_with_nodes();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].0, cid);
        let d = decode(&nodes[0].1);
        assert_eq!(d.links.len(), MAX_LINKS);
    }

    #[test]
    fn more_than_174_chunks_make_a_deeper_balanced_tree() {
        let chunk = sample(CHUNK_SIZE);
        let leaf = cid_of(RAW, &chunk);
        let n = MAX_LINKS + 2; // 176 chunks and a 5-byte tail: 177 leaves
        let mut b = CidBuilder::keeping_nodes();
        for _ in 0..n {
            b.update(&chunk);
        }
        b.update(&[1, 2, 3, 4, 5]);
        let (cid, nodes) = b.finish_with_nodes();
        let total = (n * CHUNK_SIZE + 5) as u64;
        // Two height-1 nodes (174 leaves, then 3 leaves) under one height-2 root.
        assert_eq!(nodes.len(), 3);
        let (root_cid, root) = nodes.last().unwrap();
        assert_eq!(*root_cid, cid);
        let r = decode(root);
        assert_eq!(r.filesize, total);
        assert_eq!(r.links.len(), 2);
        let first = decode(&nodes[0].1);
        let second = decode(&nodes[1].1);
        assert_eq!(r.links[0].0, nodes[0].0);
        assert_eq!(r.links[1].0, nodes[1].0);
        assert_eq!(first.links.len(), MAX_LINKS);
        assert!(
            first
                .links
                .iter()
                .all(|l| l.0 == leaf && l.2 == CHUNK_SIZE as u64)
        );
        assert_eq!(second.links.len(), 3);
        assert_eq!(
            second.blocksizes,
            vec![CHUNK_SIZE as u64, CHUNK_SIZE as u64, 5]
        );
        assert_eq!(second.links[2].0, cid_of(RAW, &[1, 2, 3, 4, 5]));
        assert_eq!(r.blocksizes, vec![first.filesize, second.filesize]);
        assert_eq!(first.filesize, (MAX_LINKS * CHUNK_SIZE) as u64);
        // Tsize of an inner node: its encoded size plus its children's Tsize.
        assert_eq!(
            r.links[0].2,
            nodes[0].1.len() as u64 + (MAX_LINKS * CHUNK_SIZE) as u64
        );
        assert_eq!(
            r.links[1].2,
            nodes[1].1.len() as u64 + 2 * CHUNK_SIZE as u64 + 5
        );
    }

    /// CIDs computed by the JavaScript IPFS importer (`ipfs-unixfs-importer` 15 with
    /// `cidVersion: 1, rawLeaves: true, fixedSize(262144), balanced(174)`, which matches kubo's
    /// `ipfs add --cid-version=1 --raw-leaves --chunker=size-262144`) over [`sample`] bytes.
    #[test]
    fn matches_the_ipfs_importer() {
        let c = CHUNK_SIZE;
        let vectors = [
            (
                0,
                "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku",
            ),
            (
                1,
                "bafkreidogqfzz75tpkmjzjke425xqcrmpcib2p5tg44hnbirumdbpl5adu",
            ),
            (
                c,
                "bafkreidtpmdhdmgsrvgltsrlzrfs5ragszmg3o3legvfagtwldoeiucayu",
            ),
            (
                c + 1,
                "bafybeidbuw2hpnkpnbwvz6xirywx74hyz64czv2fhdsr2m2c67bbpsd3m4",
            ),
            (
                3 * c + 17,
                "bafybeig53jmy6gh5pk6h3k3cbtrwhi5ltg2xnzd2ihfx4dhicikvg45yky",
            ),
            (
                174 * c,
                "bafybeifkad4lwwpmhjv3zogc6cs6jklt2bcozbnx7e6sa7v2izt4pih4l4",
            ),
            (
                174 * c + 1,
                "bafybeigktympmejeejzzjhua6csk4zi2ddb2m76y7bndfseboyvdmghwcy",
            ),
            (
                176 * c + 5,
                "bafybeih35qwm3hd4r457yu3xvucgp3fzhba5fgaz65fihvyx2f5tql7sme",
            ),
        ];
        let data = sample(176 * c + 5);
        for (n, want) in vectors {
            let mut b = CidBuilder::new();
            for piece in data[..n].chunks(1 << 20) {
                b.update(piece);
            }
            assert_eq!(b.finish().to_string(), want, "{n} bytes");
        }
    }

    #[test]
    fn a_partial_last_subtree_keeps_its_height() {
        // 174 * 174 + 1 leaves: root of height 3 over a full height-2 node and a height-2 node
        // holding one height-1 node holding the last leaf. Only structure is checked, so the
        // inner builder is fed leaves directly.
        let mut b = CidBuilder::keeping_nodes();
        let leaf = Link {
            cid: cid_of(RAW, b"x"),
            tsize: 1,
            filesize: 1,
        };
        let n = MAX_LINKS * MAX_LINKS + 1;
        for _ in 0..n {
            b.leaves += 1;
            b.push(0, leaf.clone());
        }
        let (cid, nodes) = b.finish_with_nodes();
        // 174 full height-1 nodes, 1 full height-2 node, then 1 + 1 partial nodes, then the root.
        assert_eq!(nodes.len(), MAX_LINKS + 1 + 2 + 1);
        let root = decode(&nodes.last().unwrap().1);
        assert_eq!(nodes.last().unwrap().0, cid);
        assert_eq!(root.filesize, n as u64);
        assert_eq!(root.blocksizes, vec![(MAX_LINKS * MAX_LINKS) as u64, 1]);
        let find = |c: &Cid| decode(&nodes.iter().find(|(k, _)| k == c).unwrap().1);
        let tail2 = find(&root.links[1].0);
        assert_eq!(
            tail2.links.len(),
            1,
            "the partial height-2 node keeps one child"
        );
        let tail1 = find(&tail2.links[0].0);
        assert_eq!(tail1.links.len(), 1);
        assert_eq!(tail1.links[0].0, leaf.cid);
        let full2 = find(&root.links[0].0);
        assert_eq!(full2.links.len(), MAX_LINKS);
    }
}
