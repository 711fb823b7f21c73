//! Storing firmware: the one path that checks and stores firmware bytes (uploads from the
//! API and the pages, builds, the simulator), and the release of blobs no row uses.

use axum::http::StatusCode;
use otaforge_store::model::{BuildImage, Firmware, Id, NewFirmware};

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::upload;

/// A Mender artifact of a product with keys must carry `manifest.sig`, and it must verify with
/// one of them: RSA PKCS#1 v1.5, ECDSA P-256 (raw r||s) or Ed25519, over the manifest.
fn check_artifact_signature(
    keys: &[String],
    manifest: &[u8],
    signature: Option<&[u8]>,
) -> ApiResult<()> {
    use base64::Engine;
    let refuse = |m: &str| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m.to_string());
    let signature = signature.ok_or_else(|| {
        refuse("this product takes only artifacts signed with one of its keys; the artifact has no manifest.sig")
    })?;
    let text = std::str::from_utf8(signature).unwrap_or_default();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| refuse("manifest.sig is not base64"))?;
    use crate::core::device_auth::{Ecdsa, verify_bytes};
    if keys
        .iter()
        .any(|key| verify_bytes(key, manifest, &raw, Ecdsa::Raw).is_ok())
    {
        Ok(())
    } else {
        Err(refuse(
            "manifest.sig does not verify with any of the product's artifact keys",
        ))
    }
}

impl AppState {
    /// Checks firmware bytes, stores the blob and the row: all of it or nothing. The version
    /// is `version`, or else what the image declares.
    pub async fn store_firmware(
        &self,
        product: Id,
        bytes: bytes::Bytes,
        version: Option<String>,
    ) -> ApiResult<Firmware> {
        self.store_firmware_for(product, bytes, version, None).await
    }

    /// `store_firmware` for a build that embeds a device's secrets (`personal_to`): such
    /// firmware is served only to that device, authenticated by its own password.
    pub async fn store_firmware_for(
        &self,
        product: Id,
        bytes: bytes::Bytes,
        version: Option<String>,
        personal_to: Option<Id>,
    ) -> ApiResult<Firmware> {
        let mut described = upload::describe(&bytes)?;
        if let Some(device) = personal_to {
            described.metadata["personal_to"] = device.into();
        }
        let owner = self.store().get_product(product).await?;
        crate::core::signatures::admit(&owner.firmware_keys, described.sbv2.as_deref())?;
        if crate::core::signatures::admit_arduino(
            &owner.artifact_keys,
            &bytes,
            described.esp8266,
            described.arduino,
        )? {
            described.metadata["signature"] = "verified".into();
        }
        if let Some((manifest, signature)) = &described.signed_manifest {
            let keys = owner.artifact_keys;
            if !keys.is_empty() {
                check_artifact_signature(&keys, manifest, signature.as_deref())?;
                described.metadata["signature"] = "verified".into();
            }
        }
        let version = match (version, described.version) {
            (Some(v), _) => v,
            // What an image declares is a C string: its padding is not part of it.
            (None, Some(v)) => v.trim().to_string(),
            (None, None) => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!(
                        "the file is a {} image that carries no version; pass ?version=V",
                        described.format
                    ),
                ));
            }
        };
        // The rule the OpenAPI document states: 1 to 31 printable ASCII characters, no white
        // space at either end (it fits `esp_app_desc_t.version`).
        if version.is_empty()
            || version.len() > 31
            || !version.bytes().all(|b| (b' '..=b'~').contains(&b))
            || version.trim() != version
        {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "version must be 1 to 31 printable ASCII characters, without white space at either end",
            ));
        }
        let sums = upload::digests(&bytes);
        self.inner
            .blobs
            .put(&sums.sha256, bytes.clone())
            .await
            .map_err(|e| ApiError::internal("storing firmware", e))?;
        let result = self
            .store()
            .create_firmware(NewFirmware {
                product_id: product,
                version,
                size: bytes.len() as i64,
                md5: sums.md5,
                sha256: sums.sha256.clone(),
                format: described.format.to_string(),
                metadata: described.metadata,
            })
            .await;
        match result {
            Ok(firmware) => {
                self.inner.blob_cache.insert(&firmware.sha256, bytes);
                Ok(firmware)
            }
            Err(e) => {
                self.release_blob(&sums.sha256).await;
                Err(e.into())
            }
        }
    }

    /// Keeps the images a build exported beside its application (blob, then row; a failed
    /// row releases its blob). They embed the device's secrets, so their blobs are sealed
    /// with the server's key; `sha256` names the sealed blob.
    pub async fn keep_build_images(
        &self,
        build: Id,
        images: Vec<(String, Vec<u8>)>,
    ) -> ApiResult<Vec<BuildImage>> {
        let mut kept = Vec::new();
        for (name, bytes) in images {
            use sha2::Digest;
            let size = bytes.len() as i64;
            let bytes = self
                .inner
                .sealer
                .seal_bytes(&bytes)
                .map_err(|e| ApiError::internal("sealing a build image", e))?;
            let image = BuildImage {
                sha256: hex::encode(sha2::Sha256::digest(&bytes)),
                size,
                name,
            };
            self.inner.blobs.put(&image.sha256, bytes.into()).await?;
            if let Err(e) = self.store().add_build_image(build, &image).await {
                self.release_blob(&image.sha256).await;
                return Err(e.into());
            }
            kept.push(image);
        }
        Ok(kept)
    }

    /// One kept image of a build, with its bytes.
    pub async fn build_image(
        &self,
        build: Id,
        name: &str,
    ) -> ApiResult<(BuildImage, bytes::Bytes)> {
        let image = self
            .store()
            .list_build_images(build)
            .await?
            .into_iter()
            .find(|i| i.name == name)
            .ok_or_else(|| ApiError::not_found("this build kept no image of that name"))?;
        let sealed = self.inner.blobs.get(&image.sha256).await?;
        let bytes = self.inner.sealer.open_bytes(&sealed).ok_or_else(|| {
            ApiError::internal(
                "opening a build image",
                format!("build {build}'s {name} does not open with this server's key"),
            )
        })?;
        Ok((image, bytes.into()))
    }

    /// A firmware's bytes, cut as the `Range` header asks (for links the server signed).
    pub async fn firmware_part(
        &self,
        product: Id,
        firmware: Id,
        range: Option<&str>,
    ) -> ApiResult<(Firmware, crate::delivery::Part)> {
        let firmware = self.store().get_firmware(product, firmware).await?;
        let bytes = self
            .inner
            .blob_cache
            .get(&self.inner.blobs, &firmware.sha256)
            .await?;
        let part = crate::delivery::Part::cut(range, bytes)?;
        Ok((firmware, part))
    }

    /// Deletes a blob no row refers to any more. Failures only leave garbage, never break data.
    pub async fn release_blob(&self, sha256: &str) {
        match self.store().blob_in_use(sha256).await {
            Ok(false) => {
                if let Err(e) = self.inner.blobs.delete(sha256).await {
                    tracing::warn!(error = %e, sha256, "could not delete an unused blob");
                }
            }
            Ok(true) => {}
            Err(e) => {
                tracing::warn!(error = %e, sha256, "could not check whether a blob is in use")
            }
        }
    }
}
