//! A device's sketch, made once: what its files are now, and every change to them (save,
//! add, rename, delete, restore an older revision). Each change is checked like a build
//! (`check_sketch`), saved as a new revision (nothing is ever overwritten, so every state
//! can be restored) and audited with who made it. The workspace pages only translate.

use std::collections::BTreeMap;
use std::net::IpAddr;

use axum::http::StatusCode;
use otaforge_store::model::{Device, Id, SketchRevision};

use crate::AppState;
use crate::builds::check_sketch;
use crate::compile;
use crate::error::{ApiError, ApiResult};

/// Boards offered in the workspace (any FQBN works through the API); the first is a new
/// sketch's.
pub const BOARDS: &[(&str, &str)] = &[
    ("esp32:esp32:esp32", "ESP32 Dev Module"),
    ("esp32:esp32:esp32s3", "ESP32-S3 Dev Module"),
    ("esp32:esp32:esp32c3", "ESP32-C3 Dev Module"),
    ("esp8266:esp8266:nodemcuv2", "NodeMCU 1.0 (ESP8266)"),
    ("arduino:avr:uno", "Arduino Uno"),
];

/// The sketch a device starts with.
pub const STARTER: &str = concat!(
    "// Your sketch. The platform keeps the OTA update code in every build.\n\n",
    include_str!("../../../../firmware/arduino/examples/blink.ino")
);

/// The Examples menu: (id, title, main file's content).
pub const EXAMPLES: &[(&str, &str, &str)] = &[
    (
        "blink",
        "Blink",
        include_str!("../../../../firmware/arduino/examples/blink.ino"),
    ),
    (
        "wifi-scan",
        "WiFi scan (ESP32, ESP8266)",
        include_str!("../../../../firmware/arduino/examples/wifi_scan.ino"),
    ),
    (
        "update-now",
        "Update on request: the OTAForge update header (ESP32, ESP8266)",
        include_str!("../../../../firmware/arduino/examples/update_now.ino"),
    ),
];

/// Who changes a sketch: a bot in its own workspace or an operator.
#[derive(Debug, Clone)]
pub struct Author<'a> {
    pub name: &'a str,
    pub address: Option<IpAddr>,
}

/// A sketch as it is now: its board and files.
#[derive(Debug, Clone, PartialEq)]
pub struct Sketch {
    pub fqbn: String,
    pub files: BTreeMap<String, String>,
}

fn unprocessable(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message.into())
}

impl AppState {
    /// The latest saved sketch of a device, or the starter sketch.
    pub(crate) async fn current_sketch(&self, device: &Device) -> ApiResult<Sketch> {
        Ok(
            match self.store().list_revisions(device.id, 1).await?.pop() {
                Some(r) => Sketch {
                    fqbn: r.fqbn,
                    files: r.files,
                },
                None => Sketch {
                    fqbn: BOARDS[0].0.to_string(),
                    files: BTreeMap::from([("sketch.ino".to_string(), STARTER.to_string())]),
                },
            },
        )
    }

    /// Saves edited files (name -> content; line ends made `\n`) for a board: the files not
    /// named keep their content.
    pub(crate) async fn save_sketch(
        &self,
        author: &Author<'_>,
        device: &Device,
        fqbn: &str,
        edits: BTreeMap<String, String>,
    ) -> ApiResult<Sketch> {
        let mut sketch = self.current_sketch(device).await?;
        let detail = edits.keys().cloned().collect::<Vec<_>>().join(", ");
        for (name, content) in edits {
            sketch.files.insert(name, content.replace("\r\n", "\n"));
        }
        sketch.fqbn = fqbn.to_string();
        self.keep(author, device, sketch, "saved sketch", &detail)
            .await
    }

    /// Adds an empty file (kept as it is when one of that name exists).
    pub(crate) async fn add_sketch_file(
        &self,
        author: &Author<'_>,
        device: &Device,
        name: &str,
    ) -> ApiResult<Sketch> {
        compile::check_file_name(name).map_err(unprocessable)?;
        let mut sketch = self.current_sketch(device).await?;
        if sketch.files.contains_key(name) {
            return Ok(sketch);
        }
        sketch.files.insert(name.to_string(), String::new());
        self.keep(author, device, sketch, "added sketch file", name)
            .await
    }

    /// Renames a file; the sketch must keep a `.ino` file.
    pub(crate) async fn rename_sketch_file(
        &self,
        author: &Author<'_>,
        device: &Device,
        from: &str,
        to: &str,
    ) -> ApiResult<Sketch> {
        compile::check_file_name(to).map_err(unprocessable)?;
        let mut sketch = self.current_sketch(device).await?;
        if from == to {
            return Ok(sketch);
        }
        if sketch.files.contains_key(to) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("the sketch already has a file named {to}"),
            ));
        }
        let content = sketch
            .files
            .remove(from)
            .ok_or_else(|| ApiError::not_found(format!("the sketch has no file named {from}")))?;
        sketch.files.insert(to.to_string(), content);
        if compile::main_file(&sketch.files).is_err() {
            return Err(unprocessable(format!(
                "{from} is the sketch's only .ino file: its new name must end in .ino"
            )));
        }
        self.keep(
            author,
            device,
            sketch,
            "renamed sketch file",
            &format!("{from} -> {to}"),
        )
        .await
    }

    /// Deletes a file; the sketch keeps at least one `.ino` file.
    pub(crate) async fn delete_sketch_file(
        &self,
        author: &Author<'_>,
        device: &Device,
        name: &str,
    ) -> ApiResult<Sketch> {
        let mut sketch = self.current_sketch(device).await?;
        if sketch.files.remove(name).is_none() {
            return Err(ApiError::not_found(format!(
                "the sketch has no file named {name}"
            )));
        }
        if compile::main_file(&sketch.files).is_err() {
            return Err(unprocessable(format!(
                "{name} is the sketch's only .ino file and cannot be deleted"
            )));
        }
        self.keep(author, device, sketch, "deleted sketch file", name)
            .await
    }

    /// Opens an example as the sketch (one file, `sketch.ino`; the board stays). The sketch
    /// it replaces stays in the history, restorable.
    pub(crate) async fn open_example(
        &self,
        author: &Author<'_>,
        device: &Device,
        example: &str,
    ) -> ApiResult<Sketch> {
        let (_, _, content) = EXAMPLES
            .iter()
            .find(|(id, _, _)| *id == example)
            .ok_or_else(|| ApiError::not_found(format!("there is no example named {example}")))?;
        let sketch = Sketch {
            fqbn: self.current_sketch(device).await?.fqbn,
            files: BTreeMap::from([("sketch.ino".to_string(), content.to_string())]),
        };
        self.keep(author, device, sketch, "opened example", example)
            .await
    }

    /// Makes an older revision the current sketch again (as a new revision: the states in
    /// between stay restorable).
    pub(crate) async fn restore_revision(
        &self,
        author: &Author<'_>,
        device: &Device,
        revision: Id,
    ) -> ApiResult<Sketch> {
        let old: SketchRevision = self.store().get_revision(device.id, revision).await?;
        let sketch = Sketch {
            fqbn: old.fqbn,
            files: old.files,
        };
        self.keep(
            author,
            device,
            sketch,
            "restored sketch",
            &format!("revision {revision}"),
        )
        .await
    }

    /// Checks and saves a sketch as the device's newest revision, and audits it.
    async fn keep(
        &self,
        author: &Author<'_>,
        device: &Device,
        sketch: Sketch,
        action: &str,
        detail: &str,
    ) -> ApiResult<Sketch> {
        check_sketch(&sketch.fqbn, &sketch.files)?;
        self.store()
            .save_revision(device.id, &sketch.fqbn, &sketch.files, author.name)
            .await?;
        self.audit_event(
            author.name,
            author.address,
            action,
            &format!("device {}", device.serial),
            detail,
        )
        .await;
        Ok(sketch)
    }
}
