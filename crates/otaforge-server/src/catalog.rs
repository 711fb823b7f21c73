//! A read-through cache of what a device check-in needs (product by API key, device by
//! serial, group, firmware), so that a poll answered 304 costs no database round trip.
//! Every management write clears what it may have changed: the products, groups and firmware
//! (`invalidate_settings`), every device too when it changed many device rows at once
//! (`invalidate`), or one device (`forget_device`). Processes sharing one database (`serve`
//! and `worker`, several nodes) stay coherent through it: `sync`, every half second,
//! publishes this process's writes (a new cache generation of either scope, the serials of
//! changed devices) and applies the others'. Devices stay
//! cached for ten minutes, longer than a fleet's polling interval, so a poll from a device
//! seen before reads nothing; the rest expires after a few seconds.

use std::collections::HashMap;
use std::hash::Hash;
use std::num::NonZeroI64;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use otaforge_store::model::{CacheScope, Device, Firmware, Group, Id, Product};
use otaforge_store::{Result, Store, StoreError};

const TTL: Duration = Duration::from_secs(5);
const MAX_ENTRIES: usize = 200_000;
/// Devices: kept longer than a fleet polls, and as many as a large fleet has.
const DEVICE_TTL: Duration = Duration::from_secs(600);
const MAX_DEVICES: usize = 2_000_000;

struct TtlMap<K, V> {
    entries: RwLock<HashMap<K, (Instant, V)>>,
    /// How many times the map was cleared: a value read from the store before a clear may
    /// be older than the write that cleared it, and is not kept (`put` with `since`).
    clears: std::sync::atomic::AtomicU64,
    ttl: Duration,
    max: usize,
}

impl<K: Eq + Hash, V: Clone> TtlMap<K, V> {
    fn new() -> Self {
        TtlMap {
            entries: RwLock::new(HashMap::new()),
            clears: Default::default(),
            ttl: TTL,
            max: MAX_ENTRIES,
        }
    }

    fn get(&self, key: &K) -> Option<V> {
        self.get_with(key, V::clone)
    }

    /// What `f` makes of the live entry, without cloning it.
    fn get_with<R>(&self, key: &K, f: impl FnOnce(&V) -> R) -> Option<R> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        match entries.get(key) {
            Some((at, v)) if at.elapsed() < self.ttl => Some(f(v)),
            _ => None,
        }
    }

    /// Taken before reading a value from the store, for `put`.
    fn mark(&self) -> u64 {
        self.clears.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Keeps a value read from the store after `mark` returned `since`, unless the map was
    /// cleared meanwhile (the value may predate the write that cleared it).
    fn put(&self, key: K, value: V, since: u64) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if self.clears.load(std::sync::atomic::Ordering::SeqCst) != since {
            return;
        }
        if entries.len() >= self.max {
            let ttl = self.ttl;
            entries.retain(|_, (at, _)| at.elapsed() < ttl);
            if entries.len() >= self.max {
                entries.clear();
            }
        }
        entries.insert(key, (Instant::now(), value));
    }

    fn clear(&self) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        self.clears
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        entries.clear();
    }
}

/// One product's cached devices.
type BySerial = HashMap<Box<str>, Box<Cached>>;

/// The cached devices, by product and then serial. Each entry is boxed so that the tables
/// hold only a key and a pointer (24 bytes a bucket): a million devices cost a table of about
/// 50 MB and a million entries of 112 bytes (a 104-byte `Cached` as the allocator rounds
/// it), and growing a table never copies them.
struct DeviceMap {
    products: RwLock<HashMap<Id, BySerial>>,
    /// What `Cached::at` counts seconds from.
    epoch: Instant,
    /// How many times a device was forgotten (or all of them): a row read before a forget
    /// may be older than the forget, and is not cached (`put` with `since`).
    forgets: std::sync::atomic::AtomicU64,
    /// The versions devices run, each kept once (a fleet runs a few).
    versions: std::sync::Mutex<std::collections::HashSet<Arc<str>>>,
    ttl: Duration,
    max: usize,
}

impl DeviceMap {
    fn new() -> Self {
        DeviceMap {
            products: RwLock::new(HashMap::new()),
            epoch: Instant::now(),
            forgets: Default::default(),
            versions: Default::default(),
            ttl: DEVICE_TTL,
            max: MAX_DEVICES,
        }
    }

    /// Seconds since `epoch`.
    fn now(&self) -> u32 {
        u32::try_from(self.epoch.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    fn live(&self, entry: &Cached, now: u32) -> bool {
        u64::from(now.saturating_sub(entry.at)) < self.ttl.as_secs()
    }

    fn get_with<R>(&self, product: Id, serial: &str, f: impl FnOnce(&Cached) -> R) -> Option<R> {
        let products = self.products.read().unwrap_or_else(|e| e.into_inner());
        match products.get(&product).and_then(|m| m.get(serial)) {
            Some(entry) if self.live(entry, self.now()) => Some(f(entry)),
            _ => None,
        }
    }

    /// The one copy of this version.
    fn version(&self, version: Option<String>) -> Option<Arc<str>> {
        let version = version?;
        let mut versions = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = versions.get(version.as_str()) {
            return Some(known.clone());
        }
        if versions.len() >= 10_000 {
            // Devices reporting made-up versions: the entries keep theirs, the set starts over.
            versions.clear();
        }
        let new: Arc<str> = version.into();
        versions.insert(new.clone());
        Some(new)
    }

    /// Where the forgets stand now: read before reading a row from the database.
    fn mark(&self) -> u64 {
        self.forgets.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn forgot(&self) {
        self.forgets
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Caches the device; with `since` (a `mark` taken before its row was read) only if no
    /// device was forgotten meanwhile: the row might be older than what was forgotten.
    fn put(&self, product: Id, serial: &str, mut device: Device, since: Option<u64>) {
        let version = self.version(device.telemetry.version.take());
        let mut entry = Box::new(Cached::of(device, version));
        let now = self.now();
        entry.at = now;
        let mut products = self.products.write().unwrap_or_else(|e| e.into_inner());
        if since.is_some_and(|mark| mark != self.mark()) {
            return;
        }
        if products.values().map(HashMap::len).sum::<usize>() >= self.max {
            for devices in products.values_mut() {
                devices.retain(|_, entry| self.live(entry, now));
            }
            if products.values().map(HashMap::len).sum::<usize>() >= self.max {
                products.clear();
            }
        }
        let devices = products.entry(product).or_default();
        match devices.get_mut(serial) {
            Some(old) => *old = entry,
            None => {
                devices.insert(serial.into(), entry);
            }
        }
    }

    /// Room for `more` devices of the product, made at once (a table grown step by step
    /// holds its old and new buckets at the same time).
    fn reserve(&self, product: Id, more: usize) {
        let mut products = self.products.write().unwrap_or_else(|e| e.into_inner());
        products
            .entry(product)
            .or_default()
            .reserve(more.min(self.max));
    }

    fn remove(&self, product: Id, serial: &str) {
        let mut products = self.products.write().unwrap_or_else(|e| e.into_inner());
        self.forgot();
        if let Some(devices) = products.get_mut(&product) {
            devices.remove(serial);
        }
    }

    fn clear(&self) {
        // Dropped outside the lock: freeing a million entries takes a while.
        let old = {
            let mut products = self.products.write().unwrap_or_else(|e| e.into_inner());
            self.forgot();
            std::mem::take(&mut *products)
        };
        drop(old);
    }

    fn len(&self) -> usize {
        let products = self.products.read().unwrap_or_else(|e| e.into_inner());
        products.values().map(HashMap::len).sum()
    }
}

/// A device as the cache keeps it: what check-ins decide by, in 104 bytes (a million fit in
/// about 250 MB with their keys and tables). What a device reports about itself besides its
/// version and last check-in (addresses, sizes, SDK, sketch MD5, chip) is left out: nothing
/// decides by it. Optional ids and times are packed into 8 bytes, none being 0 (database ids
/// start at 1, and no device checked in at the epoch).
struct Cached {
    /// When it was cached: seconds after `DeviceMap::epoch`.
    at: u32,
    status: otaforge_store::model::DeviceStatus,
    id: Id,
    group_id: Id,
    created_at: otaforge_store::model::Millis,
    last_seen: Option<NonZeroI64>,
    firmware_id: Option<NonZeroI64>,
    closed_firmware_id: Option<NonZeroI64>,
    open_firmware_id: Option<NonZeroI64>,
    version: Option<Arc<str>>,
    password_hash: Option<Box<str>>,
    /// What few devices have (sealed Wi-Fi secrets, Linux attributes, a Mender key), boxed
    /// together so the others pay one pointer.
    rare: Option<Box<Rare>>,
}

struct Rare {
    secrets: Option<String>,
    attributes: Option<serde_json::Value>,
    public_key: Option<String>,
}

impl Cached {
    fn of(device: Device, version: Option<Arc<str>>) -> Cached {
        let rare = (device.secrets.is_some()
            || device.attributes.is_some()
            || device.public_key.is_some())
        .then(|| {
            Box::new(Rare {
                secrets: device.secrets,
                attributes: device.attributes,
                public_key: device.public_key,
            })
        });
        let pack = |n: Option<i64>| n.and_then(NonZeroI64::new);
        Cached {
            at: 0,
            id: device.id,
            group_id: device.group_id,
            created_at: device.created_at,
            last_seen: pack(device.telemetry.last_seen),
            firmware_id: pack(device.firmware_id),
            closed_firmware_id: pack(device.closed_firmware_id),
            open_firmware_id: pack(device.open_firmware_id),
            status: device.status,
            version,
            password_hash: device.password_hash.map(String::into_boxed_str),
            rare,
        }
    }

    /// The device again (with what was left out absent).
    fn device(&self, product_id: Id, serial: &str) -> Device {
        let rare = self.rare.as_deref();
        Device {
            id: self.id,
            product_id,
            group_id: self.group_id,
            serial: serial.to_string(),
            status: self.status,
            password_hash: self.password_hash.as_deref().map(str::to_string),
            created_at: self.created_at,
            firmware_id: self.firmware_id.map(NonZeroI64::get),
            secrets: rare.and_then(|r| r.secrets.clone()),
            attributes: rare.and_then(|r| r.attributes.clone()),
            closed_firmware_id: self.closed_firmware_id.map(NonZeroI64::get),
            open_firmware_id: self.open_firmware_id.map(NonZeroI64::get),
            public_key: rare.and_then(|r| r.public_key.clone()),
            telemetry: otaforge_store::model::Telemetry {
                last_seen: self.last_seen.map(NonZeroI64::get),
                version: self.version.as_deref().map(str::to_string),
                ..Default::default()
            },
        }
    }
}

/// What `sync` has to publish: a write of either scope happened; these devices changed.
#[derive(Default)]
struct Pending {
    settings: bool,
    devices: bool,
    devices_changed: Vec<(Id, String)>,
}

pub struct Catalog {
    products: TtlMap<String, Option<Product>>,
    products_by_id: TtlMap<Id, Product>,
    /// By name (hawkBit tenants name products).
    products_by_name: TtlMap<String, Option<Product>>,
    /// (device, firmware) pairs whose wrong-chip refusal is already on the timeline.
    refusals: std::sync::Mutex<std::collections::HashSet<(Id, Id)>>,
    /// Every device a check-in may ask for, kept small (`Cached`).
    devices: DeviceMap,
    groups: TtlMap<(Id, Id), Group>,
    firmware: TtlMap<(Id, Id), Firmware>,
    /// What `sync` has to publish.
    pending: std::sync::Mutex<Pending>,
    /// The newest cache generations (settings, devices) and device change this process has
    /// applied.
    generation: std::sync::atomic::AtomicI64,
    device_generation: std::sync::atomic::AtomicI64,
    change: std::sync::atomic::AtomicI64,
    /// The devices were forgotten all at once: `sync` loads them again (`warm`).
    cold: std::sync::atomic::AtomicBool,
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog {
            products: TtlMap::new(),
            products_by_id: TtlMap::new(),
            products_by_name: TtlMap::new(),
            refusals: Default::default(),
            devices: DeviceMap::new(),
            groups: TtlMap::new(),
            firmware: TtlMap::new(),
            pending: Default::default(),
            generation: std::sync::atomic::AtomicI64::new(-1),
            device_generation: std::sync::atomic::AtomicI64::new(-1),
            change: std::sync::atomic::AtomicI64::new(-1),
            cold: std::sync::atomic::AtomicBool::new(true),
        }
    }
}

impl Catalog {
    /// Forgets everything, devices included; called after a write that changed many device
    /// rows at once (and, through `sync`, in every other process). The devices are loaded
    /// again (`warm`).
    pub fn invalidate(&self) {
        self.clear_settings();
        self.clear_devices();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.settings = true;
        pending.devices = true;
    }

    /// Forgets the products, groups and firmware; called after every management write that
    /// changed no device row, or only rows it forgets one by one (`forget_device`).
    pub fn invalidate_settings(&self) {
        self.clear_settings();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .settings = true;
    }

    /// Forgets the products, groups and firmware in this process only (`invalidate_settings`
    /// also publishes): for a change another process made and publishes itself (a rollout
    /// another node completed).
    pub fn clear_settings(&self) {
        self.products.clear();
        self.products_by_id.clear();
        self.products_by_name.clear();
        self.groups.clear();
        self.firmware.clear();
    }

    fn clear_devices(&self) {
        self.devices.clear();
        self.cold.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Forgets one device (its row changed), here and, through `sync`, everywhere.
    pub fn forget_device(&self, product_id: Id, serial: &str) {
        self.devices.remove(product_id, serial);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .devices_changed
            .push((product_id, serial.to_string()));
    }

    /// Publishes this process's writes and applies the others' (see the module's text).
    pub async fn sync(&self, store: &dyn Store) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.generation.load(Ordering::SeqCst) < 0 {
            // First run: what is in the database now is what this process starts from.
            self.generation.store(
                store.cache_generation(CacheScope::Settings).await?,
                Ordering::SeqCst,
            );
            self.device_generation.store(
                store.cache_generation(CacheScope::Devices).await?,
                Ordering::SeqCst,
            );
            self.change
                .store(store.last_device_change().await?, Ordering::SeqCst);
        }
        let taken = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let publish = async {
            if !taken.devices_changed.is_empty() {
                store.add_device_changes(&taken.devices_changed).await?;
            }
            if taken.devices {
                store.bump_cache_generation(CacheScope::Devices).await?;
            }
            if taken.settings {
                store.bump_cache_generation(CacheScope::Settings).await?;
            }
            Ok::<_, StoreError>(())
        };
        if let Err(e) = publish.await {
            // Published on the next run.
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.settings |= taken.settings;
            pending.devices |= taken.devices;
            pending.devices_changed.extend(taken.devices_changed);
            return Err(e);
        }
        let generation = store.cache_generation(CacheScope::Settings).await?;
        if generation != self.generation.swap(generation, Ordering::SeqCst) {
            self.clear_settings();
        }
        let generation = store.cache_generation(CacheScope::Devices).await?;
        if generation != self.device_generation.swap(generation, Ordering::SeqCst) {
            self.clear_devices();
        }
        let mut seen = self.change.load(Ordering::SeqCst);
        loop {
            let changes = store.device_changes_since(seen).await?;
            let Some(last) = changes.last() else {
                break;
            };
            seen = last.0;
            for (_, product, serial) in &changes {
                self.devices.remove(*product, serial);
            }
            if changes.len() < 10_000 {
                break;
            }
        }
        self.change.store(seen, Ordering::SeqCst);
        Ok(())
    }

    /// How many devices are in memory now.
    pub fn devices_in_memory(&self) -> usize {
        self.devices.len()
    }

    /// Whether the devices were forgotten all at once since the last `warm` (and takes the
    /// flag: the caller warms them).
    pub fn take_cold(&self) -> bool {
        self.cold.swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    /// Loads every device of every product (at start: the first poll of each device then
    /// reads nothing either). Returns how many.
    pub async fn warm(&self, store: &dyn Store) -> Result<usize> {
        let mut loaded = 0;
        for product in store.list_products().await? {
            let count = store
                .count_devices(product.id, &otaforge_store::model::DeviceQuery::default())
                .await?;
            self.devices
                .reserve(product.id, usize::try_from(count).unwrap_or(0));
            let mut query = otaforge_store::model::DeviceQuery {
                sort: otaforge_store::model::DeviceSort::Created,
                limit: 10_000,
                ..Default::default()
            };
            loop {
                // A row that changes while its page is in flight must not stay cached as it
                // was read: the changes since just before the read are forgotten again after.
                let before = store.last_device_change().await?;
                let page = store.device_page(product.id, &query).await?;
                let full = page.len() as i64 == query.limit;
                query.after = page.last().map(|d| query.cursor_after(d));
                for device in page {
                    let (product, serial) = (device.product_id, device.serial.clone());
                    // Corrected below by the changes since the read began.
                    self.devices.put(product, &serial, device, None);
                    loaded += 1;
                }
                for (_, product, serial) in store.device_changes_since(before).await? {
                    self.devices.remove(product, &serial);
                }
                let pending = self
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .devices_changed
                    .clone();
                for (product, serial) in pending {
                    self.devices.remove(product, &serial);
                }
                if !full || loaded >= MAX_DEVICES {
                    break;
                }
            }
        }
        Ok(loaded)
    }

    pub async fn product_by_key_digest(
        &self,
        store: &dyn Store,
        digest: &str,
    ) -> Result<Option<Product>> {
        if let Some(found) = self.products.get(&digest.to_string()) {
            return Ok(found);
        }
        let since = self.products.mark();
        let found = store.product_by_key_digest(digest).await?;
        self.products.put(digest.to_string(), found.clone(), since);
        Ok(found)
    }

    pub async fn product(&self, store: &dyn Store, id: Id) -> Result<Product> {
        if let Some(found) = self.products_by_id.get(&id) {
            return Ok(found);
        }
        let since = self.products_by_id.mark();
        let found = store.get_product(id).await?;
        self.products_by_id.put(id, found.clone(), since);
        Ok(found)
    }

    /// The product of this name, if any.
    pub async fn product_by_name(&self, store: &dyn Store, name: &str) -> Result<Option<Product>> {
        if let Some(found) = self.products_by_name.get(&name.to_string()) {
            return Ok(found);
        }
        let since = self.products_by_name.mark();
        let found = store
            .list_products()
            .await?
            .into_iter()
            .find(|p| p.name == name);
        self.products_by_name
            .put(name.to_string(), found.clone(), since);
        Ok(found)
    }

    /// True the first time this pair is refused (bounded: forgets everything past 100,000).
    pub fn first_refusal(&self, device: Id, firmware: Id) -> bool {
        let mut seen = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= 100_000 {
            seen.clear();
        }
        seen.insert((device, firmware))
    }

    /// The device, registered as New in the Default group if it is unknown.
    pub async fn device_or_register(
        &self,
        store: &dyn Store,
        product_id: Id,
        serial: &str,
    ) -> Result<Device> {
        if let Some(device) = self
            .devices
            .get_with(product_id, serial, |c| c.device(product_id, serial))
        {
            return Ok(device);
        }
        let since = self.devices.mark();
        let device = store.register_device(product_id, serial).await?;
        self.devices
            .put(product_id, serial, device.clone(), Some(since));
        Ok(device)
    }

    pub async fn device(
        &self,
        store: &dyn Store,
        product_id: Id,
        serial: &str,
    ) -> Result<Option<Device>> {
        if let Some(device) = self
            .devices
            .get_with(product_id, serial, |c| c.device(product_id, serial))
        {
            return Ok(Some(device));
        }
        let since = self.devices.mark();
        let device = store.find_device(product_id, serial).await?;
        if let Some(device) = &device {
            self.devices
                .put(product_id, serial, device.clone(), Some(since));
        }
        Ok(device)
    }

    pub async fn group(&self, store: &dyn Store, product_id: Id, id: Id) -> Result<Group> {
        if let Some(group) = self.groups.get(&(product_id, id)) {
            return Ok(group);
        }
        let since = self.groups.mark();
        let group = store.get_group(product_id, id).await?;
        self.groups.put((product_id, id), group.clone(), since);
        Ok(group)
    }

    pub async fn firmware(&self, store: &dyn Store, product_id: Id, id: Id) -> Result<Firmware> {
        if let Some(firmware) = self.firmware.get(&(product_id, id)) {
            return Ok(firmware);
        }
        let since = self.firmware.mark();
        let firmware = store.get_firmware(product_id, id).await?;
        self.firmware.put((product_id, id), firmware.clone(), since);
        Ok(firmware)
    }

    /// The firmware assigned to the device now: its own (a workspace build), else its group's
    /// image for the family it announces (`chip`). A personal build (it embeds the device's
    /// secrets) counts only when the device proved itself with its own password
    /// (`by_password`); otherwise the group's firmware is used.
    pub async fn assigned_firmware(
        &self,
        store: &dyn Store,
        device: &Device,
        by_password: bool,
        chip: Option<crate::decision::Family>,
    ) -> Result<Option<Firmware>> {
        if let Some(id) = device.firmware_id {
            match self.firmware(store, device.product_id, id).await {
                Ok(firmware)
                    if by_password || crate::decision::personal_to(&firmware).is_none() =>
                {
                    return Ok(Some(firmware));
                }
                Ok(_) => {}
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let group = match self.group(store, device.product_id, device.group_id).await {
            Ok(group) => group,
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut release = Vec::with_capacity(1 + group.other_firmware_ids.len());
        for id in group.firmware_id.iter().chain(&group.other_firmware_ids) {
            match self.firmware(store, device.product_id, *id).await {
                Ok(firmware) => release.push(firmware),
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(crate::decision::for_family(&release, chip).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use otaforge_store::model::{DeviceStatus, Telemetry};

    fn device(id: Id, serial: &str, version: &str) -> Device {
        Device {
            id,
            product_id: 1,
            group_id: 7,
            serial: serial.into(),
            status: DeviceStatus::Verified,
            password_hash: Some("$argon2id$x".into()),
            created_at: 1_700_000_000_000,
            firmware_id: Some(3),
            secrets: None,
            attributes: None,
            closed_firmware_id: None,
            open_firmware_id: Some(9),
            public_key: None,
            telemetry: Telemetry {
                last_seen: Some(1_700_000_000_500),
                version: Some(version.into()),
                sketch_md5: Some("left out".into()),
                ..Default::default()
            },
        }
    }

    #[test]
    fn a_cached_device_stays_small() {
        // A million of them are held at once; this is what the module's figures assume.
        assert!(std::mem::size_of::<Cached>() <= 104);
    }

    #[test]
    fn the_map_gives_back_what_decides_and_shares_versions() {
        let map = DeviceMap::new();
        map.put(1, "a", device(10, "a", "1.0.0"), None);
        map.put(1, "b", device(11, "b", "1.0.0"), None);
        map.put(2, "a", device(12, "a", "2.0.0"), None);
        assert_eq!(map.len(), 3);
        let back = map.get_with(1, "a", |c| c.device(1, "a")).unwrap();
        let mut expected = device(10, "a", "1.0.0");
        expected.telemetry.sketch_md5 = None;
        assert_eq!(back, expected);
        // One copy of a version however many devices run it.
        let (x, y) = (
            map.get_with(1, "a", |c| c.version.clone())
                .flatten()
                .unwrap(),
            map.get_with(1, "b", |c| c.version.clone())
                .flatten()
                .unwrap(),
        );
        assert!(Arc::ptr_eq(&x, &y));
        assert_eq!(map.get_with(2, "a", |c| c.id), Some(12));
        map.remove(1, "a");
        assert!(map.get_with(1, "a", |c| c.id).is_none());
        assert_eq!(map.get_with(1, "b", |c| c.id), Some(11));
        map.clear();
        assert_eq!(map.len(), 0);
    }

    #[test]
    fn a_setting_read_before_a_clear_is_not_cached() {
        let map: TtlMap<i64, &str> = TtlMap::new();
        // A check-in reads a group; meanwhile a write changes it and clears the map.
        let since = map.mark();
        map.clear();
        map.put(1, "old", since);
        assert_eq!(map.get(&1), None);
        let since = map.mark();
        map.put(1, "new", since);
        assert_eq!(map.get(&1), Some("new"));
    }

    #[test]
    fn a_row_read_before_a_forget_is_not_cached() {
        let map = DeviceMap::new();
        // A check-in reads the row; meanwhile another changes it and forgets the device.
        let since = map.mark();
        map.remove(1, "a");
        map.put(1, "a", device(10, "a", "1.0.0"), Some(since));
        assert!(map.get_with(1, "a", |c| c.id).is_none());
        // Read with nothing forgotten meanwhile: cached.
        let since = map.mark();
        map.put(1, "a", device(10, "a", "1.0.0"), Some(since));
        assert_eq!(map.get_with(1, "a", |c| c.id), Some(10));
    }

    #[test]
    fn an_entry_older_than_its_lifetime_is_not_served() {
        let mut map = DeviceMap::new();
        map.ttl = Duration::from_secs(0);
        map.put(1, "a", device(10, "a", "1.0.0"), None);
        assert!(map.get_with(1, "a", |c| c.id).is_none());
    }

    #[test]
    fn a_full_map_makes_room() {
        let mut map = DeviceMap::new();
        map.max = 2;
        map.put(1, "a", device(10, "a", "1"), None);
        map.put(1, "b", device(11, "b", "1"), None);
        map.put(1, "c", device(12, "c", "1"), None);
        assert!(map.len() <= 2);
        assert_eq!(map.get_with(1, "c", |c| c.id), Some(12));
    }
}
