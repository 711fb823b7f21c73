//! A read-through cache of what a device check-in needs (product by API key, device by
//! serial, group, firmware), so that a poll answered 304 costs no database round trip.
//! Every management write clears it; entries also expire after a few seconds so that
//! several server processes sharing one database converge.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use otaforge_store::model::{Device, Firmware, Group, Id, Product};
use otaforge_store::{Result, Store, StoreError};

const TTL: Duration = Duration::from_secs(5);
const MAX_ENTRIES: usize = 200_000;

struct TtlMap<K, V> {
    entries: RwLock<HashMap<K, (Instant, V)>>,
}

impl<K: Eq + Hash, V: Clone> TtlMap<K, V> {
    fn new() -> Self {
        TtlMap {
            entries: RwLock::new(HashMap::new()),
        }
    }

    fn get(&self, key: &K) -> Option<V> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        match entries.get(key) {
            Some((at, v)) if at.elapsed() < TTL => Some(v.clone()),
            _ => None,
        }
    }

    fn put(&self, key: K, value: V) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (at, _)| at.elapsed() < TTL);
            if entries.len() >= MAX_ENTRIES {
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

pub struct Catalog {
    products: TtlMap<String, Option<Product>>,
    products_by_id: TtlMap<Id, Product>,
    /// By name (hawkBit tenants name products).
    products_by_name: TtlMap<String, Option<Product>>,
    /// (device, firmware) pairs whose wrong-chip refusal is already on the timeline.
    refusals: std::sync::Mutex<std::collections::HashSet<(Id, Id)>>,
    devices: TtlMap<(Id, String), Device>,
    groups: TtlMap<(Id, Id), Group>,
    firmware: TtlMap<(Id, Id), Firmware>,
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog {
            products: TtlMap::new(),
            products_by_id: TtlMap::new(),
            products_by_name: TtlMap::new(),
            refusals: Default::default(),
            devices: TtlMap::new(),
            groups: TtlMap::new(),
            firmware: TtlMap::new(),
        }
    }
}

impl Catalog {
    /// Forgets everything; called after every management write.
    pub fn invalidate(&self) {
        self.products.clear();
        self.products_by_id.clear();
        self.products_by_name.clear();
        self.devices.clear();
        self.groups.clear();
        self.firmware.clear();
    }

    /// Forgets one device (its row changed).
    pub fn forget_device(&self, product_id: Id, serial: &str) {
        self.devices.remove(&(product_id, serial.to_string()));
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
        if let Some(device) = self.devices.get(&key) {
            return Ok(device);
        }
        let device = store.register_device(product_id, serial).await?;
        self.devices.put(key, device.clone());
        Ok(device)
    }

    pub async fn device(
        &self,
        store: &dyn Store,
        product_id: Id,
        serial: &str,
    ) -> Result<Option<Device>> {
        let key = (product_id, serial.to_string());
        if let Some(device) = self.devices.get(&key) {
            return Ok(Some(device));
        }
        let device = store.find_device(product_id, serial).await?;
        if let Some(device) = &device {
            self.devices.put(key, device.clone());
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
