//! A read-through cache of what a device check-in needs (product by API key, device by
//! serial, group, firmware), so that a poll answered 304 costs no database round trip.
//! Every management write clears it, and a changed device row forgets that device.
//! Processes sharing one database (`serve` and `worker`, several nodes) stay coherent through
//! it: `sync`, every half second, publishes this process's writes (a new cache generation for
//! a management write, the serials of changed devices) and applies the others'. Devices stay
//! cached for ten minutes, longer than a fleet's polling interval, so a poll from a device
//! seen before reads nothing; the rest expires after a few seconds.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use otaforge_store::model::{Device, Firmware, Group, Id, Product};
use otaforge_store::{Result, Store, StoreError};

const TTL: Duration = Duration::from_secs(5);
const MAX_ENTRIES: usize = 200_000;
/// Devices: kept longer than a fleet polls, and as many as a large fleet has.
const DEVICE_TTL: Duration = Duration::from_secs(600);
const MAX_DEVICES: usize = 2_000_000;

struct TtlMap<K, V> {
    entries: RwLock<HashMap<K, (Instant, V)>>,
    ttl: Duration,
    max: usize,
}

impl<K: Eq + Hash, V: Clone> TtlMap<K, V> {
    fn new() -> Self {
        Self::with(TTL, MAX_ENTRIES)
    }

    fn with(ttl: Duration, max: usize) -> Self {
        TtlMap {
            entries: RwLock::new(HashMap::new()),
            ttl,
            max,
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

    fn put(&self, key: K, value: V) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.max {
            let ttl = self.ttl;
            entries.retain(|_, (at, _)| at.elapsed() < ttl);
            if entries.len() >= self.max {
                entries.clear();
            }
        }
        entries.insert(key, (Instant::now(), value));
    }

    fn remove(&self, key: &K) {
        self.entries
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    fn clear(&self) {
        self.entries
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// A device as the cache keeps it: what check-ins decide by, in about 140 bytes plus its
/// version (a million fit in a few hundred MB with their keys). What a device reports about
/// itself besides its version and last check-in (addresses, sizes, SDK, sketch MD5, chip) is
/// left out: nothing decides by it.
#[derive(Clone)]
struct Cached {
    id: Id,
    group_id: Id,
    created_at: otaforge_store::model::Millis,
    last_seen: Option<otaforge_store::model::Millis>,
    firmware_id: Option<Id>,
    closed_firmware_id: Option<Id>,
    open_firmware_id: Option<Id>,
    status: otaforge_store::model::DeviceStatus,
    version: Option<Box<str>>,
    password_hash: Option<Box<str>>,
    /// What few devices have (sealed Wi-Fi secrets, Linux attributes, a Mender key), boxed
    /// together so the others pay one pointer.
    rare: Option<Box<Rare>>,
}

#[derive(Clone)]
struct Rare {
    secrets: Option<String>,
    attributes: Option<serde_json::Value>,
    public_key: Option<String>,
}

impl Cached {
    fn of(device: Device) -> Cached {
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
        Cached {
            id: device.id,
            group_id: device.group_id,
            created_at: device.created_at,
            last_seen: device.telemetry.last_seen,
            firmware_id: device.firmware_id,
            closed_firmware_id: device.closed_firmware_id,
            open_firmware_id: device.open_firmware_id,
            status: device.status,
            version: device.telemetry.version.map(String::into_boxed_str),
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
            firmware_id: self.firmware_id,
            secrets: rare.and_then(|r| r.secrets.clone()),
            attributes: rare.and_then(|r| r.attributes.clone()),
            closed_firmware_id: self.closed_firmware_id,
            open_firmware_id: self.open_firmware_id,
            public_key: rare.and_then(|r| r.public_key.clone()),
            telemetry: otaforge_store::model::Telemetry {
                last_seen: self.last_seen,
                version: self.version.as_deref().map(str::to_string),
                ..Default::default()
            },
        }
    }
}

pub struct Catalog {
    products: TtlMap<String, Option<Product>>,
    products_by_id: TtlMap<Id, Product>,
    /// By name (hawkBit tenants name products).
    products_by_name: TtlMap<String, Option<Product>>,
    /// (device, firmware) pairs whose wrong-chip refusal is already on the timeline.
    refusals: std::sync::Mutex<std::collections::HashSet<(Id, Id)>>,
    /// Every device a check-in may ask for, kept small (`Cached`).
    devices: TtlMap<(Id, String), Cached>,
    groups: TtlMap<(Id, Id), Group>,
    firmware: TtlMap<(Id, Id), Firmware>,
    /// What `sync` has to publish: a management write happened; these devices changed.
    pending: std::sync::Mutex<(bool, Vec<(Id, String)>)>,
    /// The newest cache generation and device change this process has applied.
    generation: std::sync::atomic::AtomicI64,
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
            devices: TtlMap::with(DEVICE_TTL, MAX_DEVICES),
            groups: TtlMap::new(),
            firmware: TtlMap::new(),
            pending: Default::default(),
            generation: std::sync::atomic::AtomicI64::new(-1),
            change: std::sync::atomic::AtomicI64::new(-1),
            cold: std::sync::atomic::AtomicBool::new(true),
        }
    }
}

impl Catalog {
    /// Forgets everything; called after every management write (and, through `sync`, in
    /// every other process).
    pub fn invalidate(&self) {
        self.clear();
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).0 = true;
    }

    fn clear(&self) {
        self.products.clear();
        self.products_by_id.clear();
        self.products_by_name.clear();
        self.devices.clear();
        self.cold.store(true, std::sync::atomic::Ordering::SeqCst);
        self.groups.clear();
        self.firmware.clear();
    }

    /// Forgets one device (its row changed), here and, through `sync`, everywhere.
    pub fn forget_device(&self, product_id: Id, serial: &str) {
        self.devices.remove(&(product_id, serial.to_string()));
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .push((product_id, serial.to_string()));
    }

    /// Publishes this process's writes and applies the others' (see the module's text).
    pub async fn sync(&self, store: &dyn Store) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.generation.load(Ordering::SeqCst) < 0 {
            // First run: what is in the database now is what this process starts from.
            self.generation
                .store(store.cache_generation().await?, Ordering::SeqCst);
            self.change
                .store(store.last_device_change().await?, Ordering::SeqCst);
        }
        let (bump, changed) =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let publish = async {
            if !changed.is_empty() {
                store.add_device_changes(&changed).await?;
            }
            if bump {
                store.bump_cache_generation().await?;
            }
            Ok::<_, StoreError>(())
        };
        if let Err(e) = publish.await {
            // Published on the next run.
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.0 |= bump;
            pending.1.extend(changed);
            return Err(e);
        }
        let generation = store.cache_generation().await?;
        if generation != self.generation.swap(generation, Ordering::SeqCst) {
            self.clear();
        }
        let mut seen = self.change.load(Ordering::SeqCst);
        loop {
            let changes = store.device_changes_since(seen).await?;
            let Some(last) = changes.last() else {
                break;
            };
            seen = last.0;
            for (_, product, serial) in &changes {
                self.devices.remove(&(*product, serial.clone()));
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
        self.devices
            .entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
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
                    let key = (device.product_id, device.serial.clone());
                    self.devices.put(key, Cached::of(device));
                    loaded += 1;
                }
                for (_, product, serial) in store.device_changes_since(before).await? {
                    self.devices.remove(&(product, serial));
                }
                let pending = self
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .1
                    .clone();
                for key in pending {
                    self.devices.remove(&key);
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
        let found = store.product_by_key_digest(digest).await?;
        self.products.put(digest.to_string(), found.clone());
        Ok(found)
    }

    pub async fn product(&self, store: &dyn Store, id: Id) -> Result<Product> {
        if let Some(found) = self.products_by_id.get(&id) {
            return Ok(found);
        }
        let found = store.get_product(id).await?;
        self.products_by_id.put(id, found.clone());
        Ok(found)
    }

    /// The product of this name, if any.
    pub async fn product_by_name(&self, store: &dyn Store, name: &str) -> Result<Option<Product>> {
        if let Some(found) = self.products_by_name.get(&name.to_string()) {
            return Ok(found);
        }
        let found = store
            .list_products()
            .await?
            .into_iter()
            .find(|p| p.name == name);
        self.products_by_name.put(name.to_string(), found.clone());
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
        let key = (product_id, serial.to_string());
        if let Some(device) = self
            .devices
            .get_with(&key, |c| c.device(product_id, serial))
        {
            return Ok(device);
        }
        let device = store.register_device(product_id, serial).await?;
        self.devices.put(key, Cached::of(device.clone()));
        Ok(device)
    }

    pub async fn device(
        &self,
        store: &dyn Store,
        product_id: Id,
        serial: &str,
    ) -> Result<Option<Device>> {
        let key = (product_id, serial.to_string());
        if let Some(device) = self
            .devices
            .get_with(&key, |c| c.device(product_id, serial))
        {
            return Ok(Some(device));
        }
        let device = store.find_device(product_id, serial).await?;
        if let Some(device) = &device {
            self.devices.put(key, Cached::of(device.clone()));
        }
        Ok(device)
    }

    pub async fn group(&self, store: &dyn Store, product_id: Id, id: Id) -> Result<Group> {
        if let Some(group) = self.groups.get(&(product_id, id)) {
            return Ok(group);
        }
        let group = store.get_group(product_id, id).await?;
        self.groups.put((product_id, id), group.clone());
        Ok(group)
    }

    pub async fn firmware(&self, store: &dyn Store, product_id: Id, id: Id) -> Result<Firmware> {
        if let Some(firmware) = self.firmware.get(&(product_id, id)) {
            return Ok(firmware);
        }
        let firmware = store.get_firmware(product_id, id).await?;
        self.firmware.put((product_id, id), firmware.clone());
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
