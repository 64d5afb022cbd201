//! The store: Dom0's xenstore-like tree of small values, server side.
//!
//! This module is transport-free: Dom0 decodes a [`Request`]
//! (`shared_abi::store`) that arrived on a domain's ring, calls
//! [`Store::handle`] (or the typed methods) with the caller's domain id, sends
//! the [`Response`] back, and then delivers what [`Store::take_events`]
//! returns to the watching domains ([`WatchEvent::response`]).
//!
//! # Tree
//!
//! Every node has a path (`/local/domain/1/name`), a value (bytes, possibly
//! empty), an owner and a list of extra per-domain permissions. [`Store::new`]
//! creates `/`, `/local` and `/local/domain`, owned by Dom0.
//! [`Store::introduce_domain`] creates a domain's *home*, `/local/domain/<id>`,
//! owned by that domain, with a `name` child written by Dom0.
//!
//! # Permissions
//!
//! The permission a domain `d` has on a path is decided by the first rule that
//! applies:
//!
//! 1. Dom0 has [`Perm::Write`] everywhere.
//! 2. Inside its own home (the home must exist, i.e. the domain was
//!    introduced and not released) a domain has `Write`, whoever created the
//!    nodes there. This cannot be revoked, but a domain may not remove its
//!    home node itself.
//! 3. Otherwise the node and then its ancestors are looked at, nearest first
//!    (missing nodes are skipped, so a path that does not exist yet is judged
//!    by its nearest existing ancestor). The first node that is *owned* by `d`
//!    gives `Write`; the first node with an explicit entry for `d` (set by
//!    [`Store::set_perm`] or [`Store::set_perms`]) gives that entry. The nearest decision wins, so an
//!    explicit [`Perm::None`] below a grant hides a subtree again. (The wire
//!    request `SetPerms` only carries an owner and a list of readers; see
//!    [`Store::set_perms`]. Write grants come from Dom0 through
//!    [`Store::set_perm`].)
//! 4. Nothing decided: [`Perm::None`].
//!
//! `Write` implies `Read`. Reading a value, listing children and watching need
//! `Read`; writing, creating and removing need `Write`. Writing a missing path
//! creates the missing parents (empty values) owned by the caller, so it needs
//! `Write` on the nearest existing ancestor. A node's owner (or Dom0, or the
//! domain whose home holds it) may change its permissions; the change applies
//! to the node's whole subtree through rule 3. Note that revoking a grant does
//! not take away nodes the grantee created meanwhile below it: it owns them.
//! Dom0 can remove them.
//!
//! # ENOENT versus EACCES
//!
//! The permission check always comes first and, for a missing path, uses the
//! nearest existing ancestor. So a domain gets `ENOENT` only for paths it would
//! be allowed to see anyway; everywhere else (say `/local/domain/2/...` seen
//! from domain 1) it gets `EACCES` whether the node exists or not, and cannot
//! probe for other domains' nodes. The names of the children of a node a
//! domain may read are part of what it reads: listing is not filtered.
//!
//! # Watches
//!
//! [`Store::watch`] needs `Read` on the watched path (judged like a read, so
//! watching a missing path in a readable place is fine). It fires once at
//! once, with the watched path, and later on every write, mkdir that created
//! a node, removal or permission change at or below the watched path, with the
//! path that changed, but only if the watcher may read that path (for a
//! removal: as it was just before). Removing a node also fires the watches set
//! on existing nodes below it, with their own path. Watches outlive the nodes
//! they name; they go with [`Store::unwatch`] or [`Store::release_domain`].
//!
//! # Limits against a hostile domain
//!
//! Paths: as [`validate_path`] (shared with clients) says: absolute, no empty,
//! `.` or `..` component, no trailing `/` (except the root itself), only
//! graphic ASCII (no space or control characters), at most [`MAX_PATH_LEN`]
//! bytes; else `EINVAL`. Values: at most [`MAX_VALUE_LEN`] bytes, else
//! `E2BIG`. Watch tokens: at most [`MAX_TOKEN_LEN`] bytes, else `EINVAL`. A domain other than
//! Dom0 may own at most [`MAX_NODES_PER_DOMAIN`] nodes (its home counts) and
//! hold at most [`MAX_WATCHES_PER_DOMAIN`] watches, else `ENOSPC`; a node holds
//! at most [`MAX_PERMS_PER_NODE`] explicit entries, else `ENOSPC`. A failed
//! call changes nothing. Each call queues at most one event per watch (plus
//! the immediate one of `watch`), so Dom0 should drain events after each call.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::ops::Bound;

use shared_abi::store::domain_path;
pub use shared_abi::store::{validate_path, Request, Response, MAX_PATH_LEN};
use shared_abi::Errno;

/// A domain id (Dom0 is 0).
pub type DomId = u16;

/// The privileged domain.
pub const DOM0: DomId = 0;
/// Largest accepted value, in bytes.
pub const MAX_VALUE_LEN: usize = 2048;
/// Most nodes a domain other than Dom0 may own.
pub const MAX_NODES_PER_DOMAIN: usize = 1000;
/// Most watches a domain other than Dom0 may hold.
pub const MAX_WATCHES_PER_DOMAIN: usize = 64;
/// Longest accepted watch token, in bytes.
pub const MAX_TOKEN_LEN: usize = 256;
/// Most explicit permission entries on one node.
pub const MAX_PERMS_PER_NODE: usize = 32;

/// Access a domain has to a node. `Write` implies `Read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Perm {
    None,
    Read,
    Write,
}

/// A watch that fired: tell domain `to` that `path` changed, with its `token`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub to: DomId,
    pub path: String,
    pub token: String,
}

struct Node {
    value: Vec<u8>,
    owner: DomId,
    perms: BTreeMap<DomId, Perm>,
    /// Names (last component) of the children.
    children: BTreeSet<String>,
}

impl Node {
    fn new(owner: DomId) -> Node {
        Node { value: Vec::new(), owner, perms: BTreeMap::new(), children: BTreeSet::new() }
    }
}

struct Watch {
    owner: DomId,
    path: String,
    token: String,
}

/// The store: the node tree, the watches and the queued watch events.
pub struct Store {
    /// Every node, by full path.
    nodes: BTreeMap<String, Node>,
    watches: Vec<Watch>,
    /// How many nodes each domain owns.
    owned: BTreeMap<DomId, usize>,
    events: Vec<WatchEvent>,
}

/// The parent of a valid path; `None` for the root.
fn parent(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

/// The last component of a valid, non-root path.
fn base_name(path: &str) -> &str {
    match path.rfind('/') {
        Some(i) => &path[i + 1..],
        None => path,
    }
}

/// `path` is `base` or lies below it.
fn is_at_or_below(path: &str, base: &str) -> bool {
    if base == "/" {
        return true;
    }
    path == base || (path.len() > base.len() && path.starts_with(base) && path.as_bytes()[base.len()] == b'/')
}

/// The home of a domain: `/local/domain/<id>`.
fn home_path(domid: DomId) -> String {
    domain_path(shared_abi::DomId(domid))
}

impl WatchEvent {
    /// The wire message to send to [`WatchEvent::to`] (with `req_id` 0).
    pub fn response(&self) -> Response {
        Response::WatchEvent { path: self.path.clone(), token: self.token.clone() }
    }
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// A store with `/`, `/local` and `/local/domain`, owned by Dom0.
    pub fn new() -> Self {
        let mut s = Store { nodes: BTreeMap::new(), watches: Vec::new(), owned: BTreeMap::new(), events: Vec::new() };
        s.insert_node("/", DOM0);
        s.insert_node("/local", DOM0);
        s.insert_node("/local/domain", DOM0);
        s
    }

    // ---- toolstack calls (Dom0 only, not reachable through `handle`) ----

    /// Creates `/local/domain/<domid>` owned by `domid` and its `name` (written
    /// by Dom0). Introducing a domain again gives the home back to it and
    /// rewrites the name. Fires watches.
    pub fn introduce_domain(&mut self, domid: DomId, name: &str) {
        let home = home_path(domid);
        // Dom0 may have removed /local or /local/domain: recreate them.
        let _ = self.create_path(DOM0, "/local/domain");
        if self.nodes.contains_key(&home) {
            self.set_owner(&home, domid);
        } else {
            self.insert_node(&home, domid);
        }
        let name_path = format!("{}/name", home);
        if !self.nodes.contains_key(&name_path) {
            self.insert_node(&name_path, DOM0);
        }
        let bytes = name.as_bytes();
        let value = bytes[..bytes.len().min(MAX_VALUE_LEN)].to_vec();
        if let Some(n) = self.nodes.get_mut(&name_path) {
            n.value = value;
        }
        self.fire(&home);
        self.fire(&name_path);
    }

    /// Forgets a domain: removes its home subtree (firing the other domains'
    /// watches), its watches and its queued events, its permission entries
    /// anywhere, and hands the nodes it owns elsewhere to Dom0, so that a
    /// later domain with the same id inherits nothing. Dom0 cannot be
    /// released (no-op).
    pub fn release_domain(&mut self, domid: DomId) {
        if domid == DOM0 {
            return;
        }
        self.watches.retain(|w| w.owner != domid);
        self.events.retain(|e| e.to != domid);
        let home = home_path(domid);
        if self.nodes.contains_key(&home) {
            self.fire_removal(&home);
            self.remove_subtree(&home);
        }
        let mut moved = 0;
        for node in self.nodes.values_mut() {
            if node.owner == domid {
                node.owner = DOM0;
                moved += 1;
            }
            node.perms.remove(&domid);
        }
        self.owned.remove(&domid);
        *self.owned.entry(DOM0).or_insert(0) += moved;
    }

    // ---- the operations a domain may request ----

    /// The value at `path`.
    pub fn read(&self, caller: DomId, path: &str) -> Result<Vec<u8>, Errno> {
        validate_path(path)?;
        self.check(caller, path, Perm::Read)?;
        self.nodes.get(path).map(|n| n.value.clone()).ok_or(Errno::ENOENT)
    }

    /// Sets the value at `path`, creating it and its missing parents (empty,
    /// owned by the caller).
    pub fn write(&mut self, caller: DomId, path: &str, value: &[u8]) -> Result<(), Errno> {
        validate_path(path)?;
        if value.len() > MAX_VALUE_LEN {
            return Err(Errno::E2BIG);
        }
        self.check(caller, path, Perm::Write)?;
        self.create_path(caller, path)?;
        if let Some(n) = self.nodes.get_mut(path) {
            n.value = value.to_vec();
        }
        self.fire(path);
        Ok(())
    }

    /// Creates `path` (empty) and its missing parents; fine if it exists.
    pub fn mkdir(&mut self, caller: DomId, path: &str) -> Result<(), Errno> {
        validate_path(path)?;
        self.check(caller, path, Perm::Write)?;
        if self.create_path(caller, path)? > 0 {
            self.fire(path);
        }
        Ok(())
    }

    /// Removes `path` and everything below it.
    pub fn remove(&mut self, caller: DomId, path: &str) -> Result<(), Errno> {
        validate_path(path)?;
        if path == "/" {
            return Err(Errno::EINVAL);
        }
        self.check(caller, path, Perm::Write)?;
        if caller != DOM0 && path == home_path(caller) {
            return Err(Errno::EACCES);
        }
        if !self.nodes.contains_key(path) {
            return Err(Errno::ENOENT);
        }
        self.fire_removal(path);
        self.remove_subtree(path);
        Ok(())
    }

    /// The names of the children of `path`, sorted.
    pub fn directory(&self, caller: DomId, path: &str) -> Result<Vec<String>, Errno> {
        validate_path(path)?;
        self.check(caller, path, Perm::Read)?;
        let node = self.nodes.get(path).ok_or(Errno::ENOENT)?;
        Ok(node.children.iter().cloned().collect())
    }

    /// Gives `domid` the permission `perm` on `path` and (unless overridden
    /// lower down) its subtree. Only Dom0, the node's owner, or the domain
    /// whose home holds the node may do this.
    pub fn set_perm(&mut self, caller: DomId, path: &str, domid: DomId, perm: Perm) -> Result<(), Errno> {
        validate_path(path)?;
        let Some(node) = self.nodes.get(path) else {
            // Do not tell a missing node from a hidden one.
            self.check(caller, path, Perm::Read)?;
            return Err(Errno::ENOENT);
        };
        let allowed = caller == DOM0 || node.owner == caller || self.in_home(caller, path);
        if !allowed {
            return Err(Errno::EACCES);
        }
        if !node.perms.contains_key(&domid) && node.perms.len() >= MAX_PERMS_PER_NODE {
            return Err(Errno::ENOSPC);
        }
        if let Some(n) = self.nodes.get_mut(path) {
            n.perms.insert(domid, perm);
        }
        self.fire(path);
        Ok(())
    }

    /// The wire form of permissions (`Request::SetPerms`): makes `owner` the
    /// node's owner and replaces its explicit entries by `Read` for each of
    /// `readers` (so it also drops `Write` grants and explicit `None`s made
    /// with [`Store::set_perm`]). Who may call it: as for `set_perm`; but only
    /// Dom0 may change the owner (`EACCES` otherwise: a domain could
    /// otherwise fill another domain's node quota or hand it nodes), and a new
    /// owner other than Dom0 must have a free node slot (`ENOSPC`). More than
    /// [`MAX_PERMS_PER_NODE`] distinct readers: `E2BIG`.
    pub fn set_perms(&mut self, caller: DomId, path: &str, owner: DomId, readers: &[DomId]) -> Result<(), Errno> {
        validate_path(path)?;
        let Some(node) = self.nodes.get(path) else {
            self.check(caller, path, Perm::Read)?;
            return Err(Errno::ENOENT);
        };
        let allowed = caller == DOM0 || node.owner == caller || self.in_home(caller, path);
        if !allowed || (owner != node.owner && caller != DOM0) {
            return Err(Errno::EACCES);
        }
        let perms: BTreeMap<DomId, Perm> = readers.iter().map(|&r| (r, Perm::Read)).collect();
        if perms.len() > MAX_PERMS_PER_NODE {
            return Err(Errno::E2BIG);
        }
        if owner != node.owner && owner != DOM0 && self.owned.get(&owner).copied().unwrap_or(0) >= MAX_NODES_PER_DOMAIN {
            return Err(Errno::ENOSPC);
        }
        self.set_owner(path, owner);
        if let Some(n) = self.nodes.get_mut(path) {
            n.perms = perms;
        }
        self.fire(path);
        Ok(())
    }

    /// Watches `path` and everything below it. Fires once at once.
    pub fn watch(&mut self, caller: DomId, path: &str, token: &str) -> Result<(), Errno> {
        validate_path(path)?;
        if token.len() > MAX_TOKEN_LEN {
            return Err(Errno::EINVAL);
        }
        self.check(caller, path, Perm::Read)?;
        if self.watches.iter().any(|w| w.owner == caller && w.path == path && w.token == token) {
            return Err(Errno::EEXIST);
        }
        if caller != DOM0 && self.watches.iter().filter(|w| w.owner == caller).count() >= MAX_WATCHES_PER_DOMAIN {
            return Err(Errno::ENOSPC);
        }
        self.watches.push(Watch { owner: caller, path: path.to_string(), token: token.to_string() });
        self.events.push(WatchEvent { to: caller, path: path.to_string(), token: token.to_string() });
        Ok(())
    }

    /// Removes the caller's watch on `path` with `token`.
    pub fn unwatch(&mut self, caller: DomId, path: &str, token: &str) -> Result<(), Errno> {
        validate_path(path)?;
        let i = self
            .watches
            .iter()
            .position(|w| w.owner == caller && w.path == path && w.token == token)
            .ok_or(Errno::ENOENT)?;
        self.watches.remove(i);
        Ok(())
    }

    /// The watch events queued by the calls so far, oldest first.
    pub fn take_events(&mut self) -> Vec<WatchEvent> {
        core::mem::take(&mut self.events)
    }

    /// Applies a decoded wire request from `caller` and returns the answer
    /// (never `Response::WatchEvent`: those come from [`Store::take_events`]).
    pub fn handle(&mut self, caller: DomId, req: Request) -> Response {
        fn done(r: Result<(), Errno>) -> Response {
            match r {
                Ok(()) => Response::Ok,
                Err(e) => e.into(),
            }
        }
        match req {
            Request::Read { path } => match self.read(caller, &path) {
                Ok(v) => Response::Value(v),
                Err(e) => e.into(),
            },
            Request::Directory { path } => match self.directory(caller, &path) {
                Ok(v) => Response::List(v),
                Err(e) => e.into(),
            },
            Request::Write { path, value } => done(self.write(caller, &path, &value)),
            Request::Mkdir { path } => done(self.mkdir(caller, &path)),
            Request::Remove { path } => done(self.remove(caller, &path)),
            Request::SetPerms { path, owner, readers } => done(self.set_perms(caller, &path, owner, &readers)),
            Request::Watch { path, token } => done(self.watch(caller, &path, &token)),
            Request::Unwatch { path, token } => done(self.unwatch(caller, &path, &token)),
            Request::GetDomainPath { domid } => Response::Path(home_path(domid)),
        }
    }

    // ---- internals ----

    /// `caller`'s home exists and holds `path`.
    fn in_home(&self, caller: DomId, path: &str) -> bool {
        if caller == DOM0 {
            return false;
        }
        let home = home_path(caller);
        is_at_or_below(path, &home) && self.nodes.contains_key(&home)
    }

    /// The permission `caller` has on `path` (see the module documentation).
    fn perm_of(&self, caller: DomId, path: &str) -> Perm {
        if caller == DOM0 || self.in_home(caller, path) {
            return Perm::Write;
        }
        let mut p = Some(path);
        while let Some(cur) = p {
            if let Some(n) = self.nodes.get(cur) {
                if n.owner == caller {
                    return Perm::Write;
                }
                if let Some(&perm) = n.perms.get(&caller) {
                    return perm;
                }
            }
            p = parent(cur);
        }
        Perm::None
    }

    fn check(&self, caller: DomId, path: &str, need: Perm) -> Result<(), Errno> {
        if self.perm_of(caller, path) >= need {
            Ok(())
        } else {
            Err(Errno::EACCES)
        }
    }

    /// Adds one node whose parent exists (or the root).
    fn insert_node(&mut self, path: &str, owner: DomId) {
        if let Some(p) = parent(path) {
            if let Some(pn) = self.nodes.get_mut(p) {
                pn.children.insert(base_name(path).to_string());
            }
        }
        self.nodes.insert(path.to_string(), Node::new(owner));
        *self.owned.entry(owner).or_insert(0) += 1;
    }

    fn set_owner(&mut self, path: &str, owner: DomId) {
        let Some(n) = self.nodes.get_mut(path) else { return };
        let old = core::mem::replace(&mut n.owner, owner);
        if let Some(c) = self.owned.get_mut(&old) {
            *c = c.saturating_sub(1);
        }
        *self.owned.entry(owner).or_insert(0) += 1;
    }

    /// Creates `path` and its missing ancestors, owned by `caller`, all or
    /// nothing. Returns how many nodes were created.
    fn create_path(&mut self, caller: DomId, path: &str) -> Result<usize, Errno> {
        let mut missing = Vec::new();
        let mut p = Some(path);
        while let Some(cur) = p {
            if self.nodes.contains_key(cur) {
                break;
            }
            missing.push(cur);
            p = parent(cur);
        }
        if missing.is_empty() {
            return Ok(0);
        }
        if caller != DOM0 {
            let have = self.owned.get(&caller).copied().unwrap_or(0);
            if have + missing.len() > MAX_NODES_PER_DOMAIN {
                return Err(Errno::ENOSPC);
            }
        }
        let missing: Vec<String> = missing.into_iter().rev().map(|s| s.to_string()).collect();
        for m in &missing {
            self.insert_node(m, caller);
        }
        Ok(missing.len())
    }

    /// Removes an existing non-root node and its subtree (no checks, no events).
    fn remove_subtree(&mut self, path: &str) {
        let lower = format!("{}/", path);
        let upper = format!("{}0", path); // '0' follows '/' in ASCII
        let below: Vec<String> = self
            .nodes
            .range::<str, _>((Bound::Included(lower.as_str()), Bound::Excluded(upper.as_str())))
            .map(|(k, _)| k.clone())
            .collect();
        for k in below.iter().map(String::as_str).chain(core::iter::once(path)) {
            if let Some(n) = self.nodes.remove(k) {
                if let Some(c) = self.owned.get_mut(&n.owner) {
                    *c = c.saturating_sub(1);
                }
            }
        }
        if let Some(p) = parent(path) {
            if let Some(pn) = self.nodes.get_mut(p) {
                pn.children.remove(base_name(path));
            }
        }
    }

    /// Queues an event for every watch at or above `path` whose owner may read it.
    fn fire(&mut self, path: &str) {
        let mut new = Vec::new();
        for w in &self.watches {
            if is_at_or_below(path, &w.path) && self.perm_of(w.owner, path) >= Perm::Read {
                new.push(WatchEvent { to: w.owner, path: path.to_string(), token: w.token.clone() });
            }
        }
        self.events.extend(new);
    }

    /// Like `fire`, for a node about to be removed: also fires the watches on
    /// existing nodes below it, with their own path. Call before removing.
    fn fire_removal(&mut self, path: &str) {
        let mut new = Vec::new();
        for w in &self.watches {
            let at = if is_at_or_below(path, &w.path) {
                path
            } else if is_at_or_below(&w.path, path) && self.nodes.contains_key(&w.path) {
                w.path.as_str()
            } else {
                continue;
            };
            if self.perm_of(w.owner, at) >= Perm::Read {
                new.push(WatchEvent { to: w.owner, path: at.to_string(), token: w.token.clone() });
            }
        }
        self.events.extend(new);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D1: DomId = 1;
    const D2: DomId = 2;
    const D3: DomId = 3;

    fn store() -> Store {
        let mut s = Store::new();
        s.introduce_domain(D1, "one");
        s.introduce_domain(D2, "two");
        s.introduce_domain(D3, "three");
        s.take_events();
        s
    }

    fn owned(s: &Store, d: DomId) -> usize {
        s.owned.get(&d).copied().unwrap_or(0)
    }

    fn ev(to: DomId, path: &str, token: &str) -> WatchEvent {
        WatchEvent { to, path: path.to_string(), token: token.to_string() }
    }

    #[test]
    fn new_store_has_the_skeleton() {
        let s = Store::new();
        assert_eq!(s.directory(DOM0, "/").unwrap(), ["local"]);
        assert_eq!(s.directory(DOM0, "/local").unwrap(), ["domain"]);
        assert!(s.directory(DOM0, "/local/domain").unwrap().is_empty());
        assert_eq!(s.read(DOM0, "/local").unwrap(), b"");
    }

    #[test]
    fn introduce_creates_home_and_name() {
        let s = store();
        assert_eq!(s.directory(DOM0, "/local/domain").unwrap(), ["1", "2", "3"]);
        assert_eq!(s.read(D1, "/local/domain/1/name").unwrap(), b"one");
        assert_eq!(s.directory(D1, "/local/domain/1").unwrap(), ["name"]);
        assert_eq!(s.nodes["/local/domain/1"].owner, D1);
        assert_eq!(owned(&s, D1), 1);
    }

    #[test]
    fn own_subtree_is_fully_accessible() {
        let mut s = store();
        s.write(D1, "/local/domain/1/data/x", b"v").unwrap();
        assert_eq!(s.read(D1, "/local/domain/1/data/x").unwrap(), b"v");
        assert_eq!(s.directory(D1, "/local/domain/1/data").unwrap(), ["x"]);
        s.mkdir(D1, "/local/domain/1/dir").unwrap();
        s.watch(D1, "/local/domain/1", "t").unwrap();
        // Even nodes Dom0 wrote there.
        s.write(D1, "/local/domain/1/name", b"renamed").unwrap();
        s.remove(D1, "/local/domain/1/data").unwrap();
        assert_eq!(s.read(D1, "/local/domain/1/data/x"), Err(Errno::ENOENT));
        // But not the home node itself.
        assert_eq!(s.remove(D1, "/local/domain/1"), Err(Errno::EACCES));
        s.set_perm(D1, "/local/domain/1/name", D2, Perm::Read).unwrap();
    }

    #[test]
    fn other_subtree_is_refused_existing_or_not() {
        let mut s = store();
        s.write(D2, "/local/domain/2/secret", b"s").unwrap();
        for p in ["/local/domain/2", "/local/domain/2/secret", "/local/domain/2/missing", "/local/domain/9/x"] {
            assert_eq!(s.read(D1, p), Err(Errno::EACCES), "{p}");
            assert_eq!(s.write(D1, p, b"x"), Err(Errno::EACCES), "{p}");
            assert_eq!(s.mkdir(D1, p), Err(Errno::EACCES), "{p}");
            assert_eq!(s.directory(D1, p), Err(Errno::EACCES), "{p}");
            assert_eq!(s.remove(D1, p), Err(Errno::EACCES), "{p}");
            assert_eq!(s.watch(D1, p, "t"), Err(Errno::EACCES), "{p}");
            assert_eq!(s.set_perm(D1, p, D1, Perm::Write), Err(Errno::EACCES), "{p}");
        }
        // Nor outside the homes.
        for p in ["/", "/local", "/local/domain", "/tool/x"] {
            assert_eq!(s.read(D1, p), Err(Errno::EACCES), "{p}");
            assert_eq!(s.write(D1, p, b"x"), Err(Errno::EACCES), "{p}");
            assert_eq!(s.directory(D1, p), Err(Errno::EACCES), "{p}");
        }
        assert_eq!(s.read(D2, "/local/domain/2/secret").unwrap(), b"s");
        assert!(s.take_events().is_empty());
    }

    #[test]
    fn missing_path_in_readable_place_is_enoent() {
        let mut s = store();
        assert_eq!(s.read(D1, "/local/domain/1/nope"), Err(Errno::ENOENT));
        assert_eq!(s.directory(D1, "/local/domain/1/nope/deeper"), Err(Errno::ENOENT));
        assert_eq!(s.remove(D1, "/local/domain/1/nope"), Err(Errno::ENOENT));
        assert_eq!(s.set_perm(D1, "/local/domain/1/nope", D2, Perm::Read), Err(Errno::ENOENT));
        assert_eq!(s.set_perm(D2, "/local/domain/1/nope", D2, Perm::Read), Err(Errno::EACCES));
        assert_eq!(s.read(DOM0, "/nope"), Err(Errno::ENOENT));
        // Watching a missing path one may read is fine.
        s.watch(D1, "/local/domain/1/later", "t").unwrap();
    }

    #[test]
    fn dom0_may_do_anything() {
        let mut s = store();
        s.write(D1, "/local/domain/1/x", b"1").unwrap();
        assert_eq!(s.read(DOM0, "/local/domain/1/x").unwrap(), b"1");
        s.write(DOM0, "/local/domain/1/x", b"2").unwrap();
        s.write(DOM0, "/tool/a/b", b"c").unwrap();
        assert_eq!(s.directory(DOM0, "/").unwrap(), ["local", "tool"]);
        s.watch(DOM0, "/local/domain/2", "t").unwrap();
        s.set_perm(DOM0, "/local/domain/1/x", D2, Perm::Read).unwrap();
        s.remove(DOM0, "/local/domain/1/x").unwrap();
        s.remove(DOM0, "/local/domain/3").unwrap();
        assert_eq!(s.remove(DOM0, "/"), Err(Errno::EINVAL));
    }

    #[test]
    fn granted_read_and_write() {
        let mut s = store();
        s.write(D1, "/local/domain/1/pub/a", b"A").unwrap();
        s.write(D1, "/local/domain/1/priv", b"P").unwrap();
        s.set_perm(D1, "/local/domain/1/pub", D2, Perm::Read).unwrap();
        // Read on the node and its subtree.
        assert_eq!(s.read(D2, "/local/domain/1/pub/a").unwrap(), b"A");
        assert_eq!(s.directory(D2, "/local/domain/1/pub").unwrap(), ["a"]);
        assert_eq!(s.read(D2, "/local/domain/1/pub/none"), Err(Errno::ENOENT));
        s.watch(D2, "/local/domain/1/pub", "t").unwrap();
        assert_eq!(s.write(D2, "/local/domain/1/pub/a", b"x"), Err(Errno::EACCES));
        assert_eq!(s.remove(D2, "/local/domain/1/pub/a"), Err(Errno::EACCES));
        assert_eq!(s.read(D2, "/local/domain/1/priv"), Err(Errno::EACCES));
        // A third domain gets nothing; the grantee cannot re-grant.
        assert_eq!(s.read(D3, "/local/domain/1/pub/a"), Err(Errno::EACCES));
        assert_eq!(s.set_perm(D2, "/local/domain/1/pub", D3, Perm::Read), Err(Errno::EACCES));

        // Upgrade to write: the grantee may write and create below, owning what it creates.
        s.set_perm(D1, "/local/domain/1/pub", D2, Perm::Write).unwrap();
        s.write(D2, "/local/domain/1/pub/a", b"x").unwrap();
        s.write(D2, "/local/domain/1/pub/b/c", b"y").unwrap();
        assert_eq!(s.nodes["/local/domain/1/pub/b"].owner, D2);
        assert_eq!(s.read(D1, "/local/domain/1/pub/b/c").unwrap(), b"y");
        s.remove(D2, "/local/domain/1/pub/a").unwrap();

        // An explicit None lower down hides a subtree again.
        s.write(D1, "/local/domain/1/pub/hidden/k", b"h").unwrap();
        s.set_perm(D1, "/local/domain/1/pub/hidden", D2, Perm::None).unwrap();
        assert_eq!(s.read(D2, "/local/domain/1/pub/hidden/k"), Err(Errno::EACCES));
        assert_eq!(s.read(D2, "/local/domain/1/pub/hidden/missing"), Err(Errno::EACCES));

        // Revoking: gone, except nodes the grantee owns.
        s.set_perm(D1, "/local/domain/1/pub", D2, Perm::None).unwrap();
        assert_eq!(s.read(D2, "/local/domain/1/pub"), Err(Errno::EACCES));
        assert_eq!(s.read(D2, "/local/domain/1/pub/b/c").unwrap(), b"y");
    }

    #[test]
    fn only_owner_or_dom0_sets_permissions() {
        let mut s = store();
        s.write(DOM0, "/tool/shared", b"").unwrap();
        assert_eq!(s.set_perm(D1, "/tool/shared", D1, Perm::Write), Err(Errno::EACCES));
        s.set_perm(DOM0, "/tool/shared", D1, Perm::Write).unwrap();
        // Write access is not ownership.
        assert_eq!(s.set_perm(D1, "/tool/shared", D2, Perm::Read), Err(Errno::EACCES));
        // But D1 owns what it creates there and may share it.
        s.write(D1, "/tool/shared/mine", b"m").unwrap();
        s.set_perm(D1, "/tool/shared/mine", D2, Perm::Read).unwrap();
        assert_eq!(s.read(D2, "/tool/shared/mine").unwrap(), b"m");
        assert_eq!(s.read(D2, "/tool/shared"), Err(Errno::EACCES));
    }

    #[test]
    fn write_creates_parents_owned_by_caller() {
        let mut s = store();
        s.write(D1, "/local/domain/1/a/b/c", b"v").unwrap();
        assert_eq!(s.read(D1, "/local/domain/1/a").unwrap(), b"");
        assert_eq!(s.read(D1, "/local/domain/1/a/b").unwrap(), b"");
        assert_eq!(s.directory(D1, "/local/domain/1/a").unwrap(), ["b"]);
        for p in ["/local/domain/1/a", "/local/domain/1/a/b", "/local/domain/1/a/b/c"] {
            assert_eq!(s.nodes[p].owner, D1);
        }
        assert_eq!(owned(&s, D1), 4);
        // mkdir on an existing node is fine and changes nothing.
        s.mkdir(D1, "/local/domain/1/a/b").unwrap();
        assert_eq!(owned(&s, D1), 4);
        s.mkdir(D1, "/local/domain/1/m/n").unwrap();
        assert_eq!(s.directory(D1, "/local/domain/1/m").unwrap(), ["n"]);
    }

    #[test]
    fn remove_is_recursive() {
        let mut s = store();
        s.write(D1, "/local/domain/1/a/b/c", b"v").unwrap();
        s.write(D1, "/local/domain/1/a/d", b"v").unwrap();
        s.write(D1, "/local/domain/1/ab", b"sibling").unwrap();
        s.write(D1, "/local/domain/1/a-", b"sibling").unwrap();
        let before = owned(&s, D1);
        s.remove(D1, "/local/domain/1/a").unwrap();
        assert_eq!(owned(&s, D1), before - 4);
        for p in ["/local/domain/1/a", "/local/domain/1/a/b", "/local/domain/1/a/b/c", "/local/domain/1/a/d"] {
            assert_eq!(s.read(D1, p), Err(Errno::ENOENT), "{p}");
        }
        assert_eq!(s.read(D1, "/local/domain/1/ab").unwrap(), b"sibling");
        assert_eq!(s.read(D1, "/local/domain/1/a-").unwrap(), b"sibling");
        assert_eq!(s.directory(D1, "/local/domain/1").unwrap(), ["a-", "ab", "name"]);
    }

    #[test]
    fn watch_fires_once_immediately_then_on_changes_below() {
        let mut s = store();
        s.watch(D1, "/local/domain/1/dev", "tok").unwrap();
        assert_eq!(s.take_events(), [ev(D1, "/local/domain/1/dev", "tok")]);
        assert!(s.take_events().is_empty());
        s.write(D1, "/local/domain/1/dev/x/y", b"1").unwrap();
        assert_eq!(s.take_events(), [ev(D1, "/local/domain/1/dev/x/y", "tok")]);
        s.write(D1, "/local/domain/1/other", b"1").unwrap();
        s.write(D1, "/local/domain/1/devx", b"1").unwrap();
        assert!(s.take_events().is_empty());
        s.mkdir(D1, "/local/domain/1/dev/x").unwrap(); // exists: no change
        assert!(s.take_events().is_empty());
        s.mkdir(D1, "/local/domain/1/dev/z").unwrap();
        assert_eq!(s.take_events(), [ev(D1, "/local/domain/1/dev/z", "tok")]);
        s.remove(D1, "/local/domain/1/dev/x").unwrap();
        assert_eq!(s.take_events(), [ev(D1, "/local/domain/1/dev/x", "tok")]);
        // Watches can be duplicated only with another token.
        assert_eq!(s.watch(D1, "/local/domain/1/dev", "tok"), Err(Errno::EEXIST));
        s.watch(D1, "/local/domain/1/dev", "tok2").unwrap();
        s.take_events();
        s.write(DOM0, "/local/domain/1/dev", b"").unwrap();
        assert_eq!(
            s.take_events(),
            [ev(D1, "/local/domain/1/dev", "tok"), ev(D1, "/local/domain/1/dev", "tok2")]
        );
        s.unwatch(D1, "/local/domain/1/dev", "tok").unwrap();
        assert_eq!(s.unwatch(D1, "/local/domain/1/dev", "tok"), Err(Errno::ENOENT));
        s.write(D1, "/local/domain/1/dev/q", b"").unwrap();
        assert_eq!(s.take_events(), [ev(D1, "/local/domain/1/dev/q", "tok2")]);
    }

    #[test]
    fn removing_a_parent_fires_watches_below() {
        let mut s = store();
        s.write(D1, "/local/domain/1/a/b", b"").unwrap();
        s.watch(D1, "/local/domain/1/a/b", "below").unwrap();
        s.watch(D1, "/local/domain/1/a/b/never", "missing").unwrap();
        s.take_events();
        s.remove(D1, "/local/domain/1/a").unwrap();
        assert_eq!(s.take_events(), [ev(D1, "/local/domain/1/a/b", "below")]);
    }

    #[test]
    fn watch_does_not_fire_for_unreadable_paths() {
        let mut s = store();
        s.mkdir(D1, "/local/domain/1/pub").unwrap();
        s.write(D1, "/local/domain/1/pub/private/k", b"").unwrap();
        s.set_perm(D1, "/local/domain/1", D2, Perm::Read).unwrap();
        s.set_perm(D1, "/local/domain/1/pub/private", D2, Perm::None).unwrap();
        s.watch(D2, "/local/domain/1", "w").unwrap();
        s.watch(DOM0, "/", "all").unwrap();
        s.take_events();
        s.write(D1, "/local/domain/1/pub/private/k", b"secret").unwrap();
        assert_eq!(s.take_events(), [ev(DOM0, "/local/domain/1/pub/private/k", "all")]);
        s.remove(D1, "/local/domain/1/pub/private").unwrap();
        assert_eq!(s.take_events(), [ev(DOM0, "/local/domain/1/pub/private", "all")]);
        s.write(D1, "/local/domain/1/pub/open", b"").unwrap();
        assert_eq!(
            s.take_events(),
            [ev(D2, "/local/domain/1/pub/open", "w"), ev(DOM0, "/local/domain/1/pub/open", "all")]
        );
        // Other domains' changes never reach D3.
        s.watch(D3, "/local/domain/3", "mine").unwrap();
        s.take_events();
        s.write(D1, "/local/domain/1/x", b"").unwrap();
        assert!(s.take_events().iter().all(|e| e.to != D3));
    }

    #[test]
    fn release_domain_removes_subtree_watches_and_traces() {
        let mut s = store();
        s.write(D1, "/local/domain/1/a", b"").unwrap();
        s.watch(D1, "/local/domain/1", "t").unwrap();
        s.watch(DOM0, "/local/domain", "d0").unwrap();
        s.write(DOM0, "/tool/shared", b"").unwrap();
        s.set_perm(DOM0, "/tool/shared", D1, Perm::Write).unwrap();
        s.write(D1, "/tool/shared/made-by-1", b"").unwrap();
        s.set_perm(D2, "/local/domain/2", D1, Perm::Read).unwrap();
        // D2 leaves something in D1's home.
        s.set_perm(D1, "/local/domain/1", D2, Perm::Write).unwrap();
        s.write(D2, "/local/domain/1/from2", b"").unwrap();
        let d2_before = owned(&s, D2);
        s.take_events();

        s.release_domain(D1);
        let evs = s.take_events();
        assert_eq!(evs, [ev(DOM0, "/local/domain/1", "d0")]);
        assert_eq!(s.read(DOM0, "/local/domain/1"), Err(Errno::ENOENT));
        assert_eq!(s.directory(DOM0, "/local/domain").unwrap(), ["2", "3"]);
        assert!(s.watches.iter().all(|w| w.owner != D1));
        assert_eq!(owned(&s, D1), 0);
        assert_eq!(owned(&s, D2), d2_before - 1);
        assert_eq!(s.nodes["/tool/shared/made-by-1"].owner, DOM0);
        assert!(s.nodes.values().all(|n| !n.perms.contains_key(&D1)));
        // A released domain has no home any more and cannot recreate it.
        assert_eq!(s.write(D1, "/local/domain/1/x", b""), Err(Errno::EACCES));
        assert_eq!(s.read(D1, "/tool/shared/made-by-1"), Err(Errno::EACCES));
        // A new domain with the same id starts clean.
        s.introduce_domain(D1, "again");
        assert_eq!(s.read(D1, "/local/domain/1/name").unwrap(), b"again");
        assert_eq!(s.read(D1, "/local/domain/2"), Err(Errno::EACCES));
        for i in 0..MAX_WATCHES_PER_DOMAIN {
            s.watch(D1, "/local/domain/1", &format!("{i}")).unwrap();
        }
        // Releasing Dom0 is a no-op.
        s.release_domain(DOM0);
        assert!(s.read(DOM0, "/local").is_ok());
    }

    #[test]
    fn introduce_again_and_after_dom0_removed_skeleton() {
        let mut s = store();
        s.remove(DOM0, "/local").unwrap();
        s.introduce_domain(4, "four");
        assert_eq!(s.read(4, "/local/domain/4/name").unwrap(), b"four");
        s.write(DOM0, "/local/domain/5/pre", b"").unwrap();
        s.introduce_domain(5, "five");
        assert_eq!(s.nodes["/local/domain/5"].owner, 5);
        s.introduce_domain(5, "renamed");
        assert_eq!(s.read(5, "/local/domain/5/name").unwrap(), b"renamed");
        assert_eq!(owned(&s, 5), 1);
    }

    #[test]
    fn value_size_limit() {
        let mut s = store();
        let big = [b'x'; MAX_VALUE_LEN + 1];
        assert_eq!(s.write(D1, "/local/domain/1/v", &big), Err(Errno::E2BIG));
        assert_eq!(s.write(DOM0, "/v", &big), Err(Errno::E2BIG));
        assert_eq!(s.read(D1, "/local/domain/1/v"), Err(Errno::ENOENT));
        s.write(D1, "/local/domain/1/v", &big[..MAX_VALUE_LEN]).unwrap();
        assert_eq!(s.read(D1, "/local/domain/1/v").unwrap().len(), MAX_VALUE_LEN);
    }

    #[test]
    fn node_limit() {
        let mut s = store();
        // The home counts as one.
        for i in 0..MAX_NODES_PER_DOMAIN - 2 {
            s.write(D1, &format!("/local/domain/1/n{i}"), b"").unwrap();
        }
        // Two missing nodes, one slot left: all or nothing.
        assert_eq!(s.write(D1, "/local/domain/1/p/q", b""), Err(Errno::ENOSPC));
        assert_eq!(s.read(D1, "/local/domain/1/p"), Err(Errno::ENOENT));
        s.write(D1, "/local/domain/1/last", b"").unwrap();
        assert_eq!(owned(&s, D1), MAX_NODES_PER_DOMAIN);
        assert_eq!(s.write(D1, "/local/domain/1/more", b""), Err(Errno::ENOSPC));
        assert_eq!(s.mkdir(D1, "/local/domain/1/more"), Err(Errno::ENOSPC));
        // Overwriting is fine; removing frees slots.
        s.write(D1, "/local/domain/1/n0", b"x").unwrap();
        s.remove(D1, "/local/domain/1/n1").unwrap();
        s.write(D1, "/local/domain/1/more", b"").unwrap();
        // Other domains and Dom0 are not affected.
        s.write(D2, "/local/domain/2/x", b"").unwrap();
        for i in 0..MAX_NODES_PER_DOMAIN {
            s.write(DOM0, &format!("/tool/{i}"), b"").unwrap();
        }
    }

    #[test]
    fn watch_limit() {
        let mut s = store();
        for i in 0..MAX_WATCHES_PER_DOMAIN {
            s.watch(D1, "/local/domain/1", &format!("t{i}")).unwrap();
        }
        assert_eq!(s.watch(D1, "/local/domain/1/x", "t"), Err(Errno::ENOSPC));
        s.watch(D2, "/local/domain/2", "t").unwrap();
        s.unwatch(D1, "/local/domain/1", "t0").unwrap();
        s.watch(D1, "/local/domain/1/x", "t").unwrap();
        for i in 0..MAX_WATCHES_PER_DOMAIN + 1 {
            s.watch(DOM0, "/", &format!("t{i}")).unwrap();
        }
        let long = "t".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(s.watch(D2, "/local/domain/2", &long), Err(Errno::EINVAL));
    }

    #[test]
    fn perm_entry_limit() {
        let mut s = store();
        s.write(D1, "/local/domain/1/x", b"").unwrap();
        for d in 0..MAX_PERMS_PER_NODE as DomId {
            s.set_perm(D1, "/local/domain/1/x", 100 + d, Perm::Read).unwrap();
        }
        assert_eq!(s.set_perm(D1, "/local/domain/1/x", 999, Perm::Read), Err(Errno::ENOSPC));
        // Changing an existing entry is fine.
        s.set_perm(D1, "/local/domain/1/x", 100, Perm::Write).unwrap();
    }

    #[test]
    fn path_validation() {
        let mut s = store();
        let long = format!("/local/domain/1/{}", "a".repeat(MAX_PATH_LEN - 16 + 1));
        assert_eq!(long.len(), MAX_PATH_LEN + 1);
        let bad = [
            "", "local", "local/domain", "/local/", "//", "/local//domain", "/local/domain/1/..", "/local/../local",
            "/local/./domain", "/a b", "/a\tb", "/a\u{1}", "/é", "/a\0", long.as_str(),
        ];
        for p in bad {
            assert_eq!(validate_path(p), Err(Errno::EINVAL), "{p:?}");
            assert_eq!(s.read(DOM0, p), Err(Errno::EINVAL), "{p:?}");
            assert_eq!(s.write(DOM0, p, b""), Err(Errno::EINVAL), "{p:?}");
            assert_eq!(s.mkdir(DOM0, p), Err(Errno::EINVAL), "{p:?}");
            assert_eq!(s.remove(DOM0, p), Err(Errno::EINVAL), "{p:?}");
            assert_eq!(s.directory(DOM0, p), Err(Errno::EINVAL), "{p:?}");
            assert_eq!(s.set_perm(DOM0, p, D1, Perm::Read), Err(Errno::EINVAL), "{p:?}");
            assert_eq!(s.watch(DOM0, p, "t"), Err(Errno::EINVAL), "{p:?}");
            assert_eq!(s.unwatch(DOM0, p, "t"), Err(Errno::EINVAL), "{p:?}");
        }
        let ok_long = &long[..MAX_PATH_LEN];
        for p in ["/", "/a", "/a/b-c_d@e.f", "/...", "/.a", ok_long] {
            assert_eq!(validate_path(p), Ok(()), "{p:?}");
        }
        s.write(D1, ok_long, b"").unwrap();
    }

    #[test]
    fn path_helpers() {
        assert_eq!(parent("/"), None);
        assert_eq!(parent("/a"), Some("/"));
        assert_eq!(parent("/a/b"), Some("/a"));
        assert_eq!(base_name("/a/b"), "b");
        assert!(is_at_or_below("/a/b", "/a"));
        assert!(is_at_or_below("/a", "/a"));
        assert!(is_at_or_below("/a", "/"));
        assert!(!is_at_or_below("/ab", "/a"));
        assert!(!is_at_or_below("/a", "/a/b"));
    }

    #[test]
    fn set_perms_wire_form() {
        let mut s = store();
        s.write(D1, "/local/domain/1/k/sub", b"v").unwrap();
        s.set_perm(D1, "/local/domain/1/k", D3, Perm::Write).unwrap();
        // Readers replace every explicit entry.
        s.set_perms(D1, "/local/domain/1/k", D1, &[D2, D2]).unwrap();
        assert_eq!(s.read(D2, "/local/domain/1/k/sub").unwrap(), b"v");
        assert_eq!(s.write(D2, "/local/domain/1/k/sub", b""), Err(Errno::EACCES));
        assert_eq!(s.read(D3, "/local/domain/1/k/sub"), Err(Errno::EACCES));
        // Only Dom0 changes the owner.
        assert_eq!(s.set_perms(D1, "/local/domain/1/k", D2, &[]), Err(Errno::EACCES));
        assert_eq!(s.set_perms(D2, "/local/domain/1/k", D1, &[D2, D3]), Err(Errno::EACCES));
        s.write(DOM0, "/tool/x", b"t").unwrap();
        let d2 = owned(&s, D2);
        s.set_perms(DOM0, "/tool/x", D2, &[]).unwrap();
        assert_eq!(owned(&s, D2), d2 + 1);
        s.write(D2, "/tool/x", b"mine").unwrap();
        s.set_perms(D2, "/tool/x", D2, &[D3]).unwrap();
        assert_eq!(s.read(D3, "/tool/x").unwrap(), b"mine");
        // Limits and missing nodes.
        let many: Vec<DomId> = (0..=MAX_PERMS_PER_NODE as DomId).collect();
        assert_eq!(s.set_perms(DOM0, "/tool/x", D2, &many), Err(Errno::E2BIG));
        assert_eq!(s.set_perms(D1, "/local/domain/1/none", D1, &[]), Err(Errno::ENOENT));
        assert_eq!(s.set_perms(D1, "/local/domain/2/none", D1, &[]), Err(Errno::EACCES));
        assert_eq!(s.set_perms(D1, "bad", D1, &[]), Err(Errno::EINVAL));
        for i in 0..MAX_NODES_PER_DOMAIN - owned(&s, D3) {
            s.write(D3, &format!("/local/domain/3/n{i}"), b"").unwrap();
        }
        assert_eq!(s.set_perms(DOM0, "/tool/x", D3, &[]), Err(Errno::ENOSPC));
        assert_eq!(s.nodes["/tool/x"].owner, D2);
    }

    #[test]
    fn handle_maps_wire_requests() {
        let mut s = store();
        let p = |x: &str| x.to_string();
        assert_eq!(s.handle(D1, Request::Write { path: p("/local/domain/1/k"), value: b"v".to_vec() }), Response::Ok);
        assert_eq!(s.handle(D1, Request::Read { path: p("/local/domain/1/k") }), Response::Value(b"v".to_vec()));
        assert_eq!(
            s.handle(D1, Request::Directory { path: p("/local/domain/1") }),
            Response::List(vec![p("k"), p("name")])
        );
        assert_eq!(s.handle(D1, Request::Mkdir { path: p("/local/domain/1/d") }), Response::Ok);
        assert_eq!(
            s.handle(D1, Request::SetPerms { path: p("/local/domain/1/k"), owner: D1, readers: vec![D2] }),
            Response::Ok
        );
        assert_eq!(s.handle(D2, Request::Read { path: p("/local/domain/1/k") }), Response::Value(b"v".to_vec()));
        s.take_events();
        assert_eq!(s.handle(D2, Request::Watch { path: p("/local/domain/1/k"), token: p("t") }), Response::Ok);
        let evs = s.take_events();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].to, D2);
        assert_eq!(evs[0].response(), Response::WatchEvent { path: p("/local/domain/1/k"), token: p("t") });
        assert_eq!(s.handle(D2, Request::Unwatch { path: p("/local/domain/1/k"), token: p("t") }), Response::Ok);
        assert_eq!(s.handle(D1, Request::Remove { path: p("/local/domain/1/k") }), Response::Ok);
        assert_eq!(s.handle(D2, Request::Read { path: p("/local/domain/1/k") }), Response::from(Errno::EACCES));
        assert_eq!(s.handle(D1, Request::Read { path: p("/local/domain/1/k") }).errno(), Some(Errno::ENOENT));
        assert_eq!(s.handle(D1, Request::Read { path: p("bad") }).errno(), Some(Errno::EINVAL));
        assert_eq!(s.handle(D1, Request::GetDomainPath { domid: 7 }), Response::Path(p("/local/domain/7")));
    }

    // ---- random operations from several domains ----

    #[derive(Debug, Clone)]
    enum Op {
        Write(DomId, String, Vec<u8>),
        Mkdir(DomId, String),
        Remove(DomId, String),
        Read(DomId, String),
        Dir(DomId, String),
        SetPerm(DomId, String, DomId, Perm),
        SetPerms(DomId, String, DomId, Vec<DomId>),
        Watch(DomId, String, String),
        Unwatch(DomId, String, String),
        Introduce(DomId),
        Release(DomId),
    }

    fn dom() -> impl Strategy<Value = DomId> {
        prop_oneof![1 => Just(DOM0), 6 => 1..4u16]
    }

    fn path() -> impl Strategy<Value = String> {
        let base = prop_oneof![
            Just(String::from("/")),
            Just(String::from("/local")),
            Just(String::from("/local/domain")),
            (1..5u16).prop_map(|d| format!("/local/domain/{d}")),
            Just(String::from("/shared")),
        ];
        let comp = prop_oneof![Just("a"), Just("b"), Just("c"), Just("name"), Just(".."), Just("")];
        (base, prop::collection::vec(comp, 0..4)).prop_map(|(b, cs)| {
            let mut p = b;
            for c in cs {
                if !p.ends_with('/') {
                    p.push('/');
                }
                p.push_str(c);
            }
            p
        })
    }

    fn perm() -> impl Strategy<Value = Perm> {
        prop_oneof![Just(Perm::None), Just(Perm::Read), Just(Perm::Write)]
    }

    fn op() -> impl Strategy<Value = Op> {
        let value = prop::collection::vec(any::<u8>(), 0..8);
        let token = prop_oneof![Just(String::from("t")), Just(String::from("u"))];
        prop_oneof![
            6 => (dom(), path(), value).prop_map(|(d, p, v)| Op::Write(d, p, v)),
            2 => (dom(), path()).prop_map(|(d, p)| Op::Mkdir(d, p)),
            2 => (dom(), path()).prop_map(|(d, p)| Op::Remove(d, p)),
            6 => (dom(), path()).prop_map(|(d, p)| Op::Read(d, p)),
            3 => (dom(), path()).prop_map(|(d, p)| Op::Dir(d, p)),
            3 => (dom(), path(), 0..5u16, perm()).prop_map(|(d, p, g, x)| Op::SetPerm(d, p, g, x)),
            2 => (dom(), path(), 0..5u16, prop::collection::vec(0..5u16, 0..3))
                .prop_map(|(d, p, o, r)| Op::SetPerms(d, p, o, r)),
            2 => (dom(), path(), token.clone()).prop_map(|(d, p, t)| Op::Watch(d, p, t)),
            1 => (dom(), path(), token).prop_map(|(d, p, t)| Op::Unwatch(d, p, t)),
            1 => (1..5u16).prop_map(Op::Introduce),
            1 => (1..5u16).prop_map(Op::Release),
        ]
    }

    /// The domain whose home holds `path`, if any.
    fn home_of(path: &str) -> Option<DomId> {
        let rest = path.strip_prefix("/local/domain/")?;
        rest.split('/').next()?.parse().ok()
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Entry {
        /// Created the node (or was made its owner): like a grant, and
        /// stronger than an entry on the same node.
        Own,
        Grant,
        Deny,
    }

    /// What each domain was allowed or denied where, recorded from the
    /// calls that succeeded, as (domain, path, entry), oldest first.
    struct Model {
        entries: Vec<(DomId, String, Entry)>,
    }

    impl Model {
        /// `d` may legitimately see `path` outside its home: the nearest
        /// entry for `d` at or above it is a grant or ownership.
        fn may_see(&self, d: DomId, path: &str) -> bool {
            let nearest = self
                .entries
                .iter()
                .enumerate()
                .filter(|(_, (g, p, _))| *g == d && is_at_or_below(path, p))
                .max_by_key(|(i, (_, p, e))| (p.len(), *e == Entry::Own, *i));
            d == DOM0 || matches!(nearest, Some((_, (_, _, Entry::Own | Entry::Grant))))
        }

        fn set(&mut self, d: DomId, path: &str, e: Entry) {
            self.entries.retain(|(g, p, old)| !(*g == d && p == path && (e == Entry::Own || *old != Entry::Own)));
            self.entries.push((d, path.to_string(), e));
        }

        /// Nodes at or below `path` are gone, and their entries with them.
        fn removed(&mut self, path: &str) {
            self.entries.retain(|(_, p, _)| !is_at_or_below(p, path));
        }
    }

    /// `path` and those of its ancestors that do not exist in `s`.
    fn missing_nodes(s: &Store, path: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut p = Some(path);
        while let Some(cur) = p.filter(|c| !s.nodes.contains_key(*c)) {
            out.push(cur.to_string());
            p = parent(cur);
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn random_ops_never_leak(ops in prop::collection::vec(op(), 1..80)) {
            let mut s = Store::new();
            let mut m = Model { entries: Vec::new() };
            // Each domain shares a subtree with the next one, except one
            // hidden corner.
            for d in 1..4u16 {
                let next = d % 3 + 1;
                s.introduce_domain(d, "dom");
                s.write(d, &format!("/local/domain/{d}/secret"), b"s").unwrap();
                s.write(d, &format!("/local/domain/{d}/b/a/c"), b"hidden").unwrap();
                s.set_perm(d, &format!("/local/domain/{d}/b"), next, Perm::Read).unwrap();
                s.set_perm(d, &format!("/local/domain/{d}/b/a"), next, Perm::None).unwrap();
                m.set(next, &format!("/local/domain/{d}/b"), Entry::Grant);
                m.set(next, &format!("/local/domain/{d}/b/a"), Entry::Deny);
                s.watch(next, &format!("/local/domain/{d}/b"), "seed").unwrap();
            }
            s.take_events();
            for op in ops {
                // A success (or ENOENT) in another domain's home must be
                // backed by the model.
                let guard = |d: DomId, p: &str, ok: bool, m: &Model| {
                    if ok {
                        if let Some(h) = home_of(p) {
                            if h != d {
                                prop_assert!(m.may_see(d, p), "{} saw {}", d, p);
                            }
                        }
                    }
                    Ok(())
                };
                // Model updates that must wait until the events are checked
                // (a removal's events are judged on the state before it).
                let mut gone: Vec<String> = Vec::new();
                let mut released = None;
                match &op {
                    Op::Write(d, p, _) | Op::Mkdir(d, p) => {
                        let created = missing_nodes(&s, p);
                        let r = match &op {
                            Op::Write(_, _, v) => s.write(*d, p, v),
                            _ => s.mkdir(*d, p),
                        };
                        guard(*d, p, r.is_ok(), &m)?;
                        if r.is_ok() {
                            for c in &created {
                                m.set(*d, c, Entry::Own);
                            }
                        }
                    }
                    Op::Remove(d, p) => {
                        let r = s.remove(*d, p);
                        guard(*d, p, r.is_ok(), &m)?;
                        if r.is_ok() {
                            gone.push(p.clone());
                        }
                    }
                    Op::Read(d, p) => {
                        let r = s.read(*d, p);
                        // ENOENT also tells something: only where one may see.
                        guard(*d, p, r.is_ok() || r == Err(Errno::ENOENT), &m)?;
                    }
                    Op::Dir(d, p) => {
                        let r = s.directory(*d, p);
                        guard(*d, p, r.is_ok() || r == Err(Errno::ENOENT), &m)?;
                    }
                    Op::SetPerm(d, p, g, x) => {
                        let ok = s.set_perm(*d, p, *g, *x).is_ok();
                        // Only someone who may see a node can share it.
                        guard(*d, p, ok, &m)?;
                        if ok {
                            m.set(*g, p, if *x == Perm::None { Entry::Deny } else { Entry::Grant });
                        }
                    }
                    Op::SetPerms(d, p, o, r) => {
                        let ok = s.set_perms(*d, p, *o, r).is_ok();
                        guard(*d, p, ok, &m)?;
                        if ok {
                            // Replaces every entry of the node, ownership included.
                            m.entries.retain(|(_, q, _)| q != p);
                            m.set(*o, p, Entry::Own);
                            for g in r {
                                m.set(*g, p, Entry::Grant);
                            }
                        }
                    }
                    Op::Watch(d, p, t) => {
                        let r = s.watch(*d, p, t);
                        guard(*d, p, r.is_ok(), &m)?;
                    }
                    Op::Unwatch(d, p, t) => {
                        let _ = s.unwatch(*d, p, t);
                    }
                    Op::Introduce(d) => s.introduce_domain(*d, "again"),
                    Op::Release(d) => {
                        s.release_domain(*d);
                        gone.push(home_path(*d));
                        released = Some(*d);
                    }
                }
                for e in s.take_events() {
                    if let Some(h) = home_of(&e.path) {
                        if h != e.to {
                            prop_assert!(m.may_see(e.to, &e.path), "event {:?} leaked", e);
                        }
                    }
                    // Outside removals the event is judged on the state after
                    // the call: the watcher must be able to read its path now.
                    if gone.is_empty() && released.is_none() {
                        prop_assert_ne!(s.read(e.to, &e.path), Err(Errno::EACCES), "event {:?} unreadable", e);
                    }
                }
                for p in &gone {
                    m.removed(p);
                }
                if let Some(d) = released {
                    // Its entries are dropped, its nodes elsewhere go to Dom0.
                    m.entries.retain(|(g, _, _)| *g != d);
                }
                // Invariants: quotas, tree consistency, counts.
                for d in 1..5u16 {
                    let n = s.nodes.values().filter(|n| n.owner == d).count();
                    prop_assert_eq!(n, owned(&s, d));
                    prop_assert!(n <= MAX_NODES_PER_DOMAIN);
                    prop_assert!(s.watches.iter().filter(|w| w.owner == d).count() <= MAX_WATCHES_PER_DOMAIN);
                }
                prop_assert!(s.nodes.contains_key("/"));
                for (path, node) in &s.nodes {
                    prop_assert!(validate_path(path).is_ok());
                    prop_assert!(node.value.len() <= MAX_VALUE_LEN);
                    if let Some(par) = parent(path) {
                        prop_assert!(s.nodes[par].children.contains(base_name(path)), "orphan {}", path);
                    }
                    for c in &node.children {
                        let child = if path == "/" { format!("/{c}") } else { format!("{path}/{c}") };
                        prop_assert!(s.nodes.contains_key(&child), "dangling child {}", child);
                    }
                }
            }
        }
    }
}
