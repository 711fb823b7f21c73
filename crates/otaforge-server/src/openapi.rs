//! The OpenAPI document of the management API, served at `/api/v1/openapi.json`, derived by
//! utoipa from the handlers' own request and response types and their `#[utoipa::path]`
//! annotations: a body or status code that changes in a handler changes the document.

use axum::Json;
use serde::Serialize;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

use otaforge_store::model as m;

/// Every error answer of the API.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, in words for the client.
    pub error: String,
}

/// Bytes: a firmware image or resource file.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct Binary(#[allow(dead_code)] Vec<u8>);

/// What a route of the API may answer besides its success; each is `{"error": "..."}`.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum Refusals {
    /// Malformed path, query, header or JSON.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No token, or an expired or revoked one (or a failed login).
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The token's user may not do this.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// No such product, group, device, firmware, rollout, build or token.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// The method is not served at this path.
    #[response(status = 405)]
    MethodNotAllowed,
    /// A name that exists already, or something still referring to what is deleted.
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// The body is larger than the server's limit.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// The body is not JSON (`Content-Type`).
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// Well-formed but invalid: a bad name, serial, version or image.
    #[response(status = 422)]
    Unprocessable(ErrorBody),
    /// Too many failed logins, or too many queued builds.
    #[response(status = 429)]
    TooMany(ErrorBody),
    /// Busy checking passwords; try again shortly.
    #[response(status = 503)]
    Busy(ErrorBody),
}

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "OTAForge management API",
        description = "Products, groups, devices, firmware, resources, builds, rollouts and tokens of an OTAForge server. Every route but login and this document needs `Authorization: Bearer <token>`. Errors are `{\"error\": \"message\"}`."
    ),
    modifiers(&Bearer),
    paths(
        crate::api::login,
        crate::api::list_tokens,
        crate::api::revoke_token,
        crate::api::list_operators,
        crate::api::create_operator,
        crate::api::change_operator,
        crate::api::delete_operator,
        crate::api::list_products,
        crate::api::create_product,
        crate::api::get_product,
        crate::api::patch_product,
        crate::api::delete_product,
        crate::api::rotate_key,
        crate::api::set_artifact_keys,
        crate::api::set_firmware_keys,
        crate::api::list_groups,
        crate::api::create_group,
        crate::api::get_group,
        crate::api::patch_group,
        crate::api::delete_group,
        crate::api::list_resources,
        crate::api::upload_resource,
        crate::api::delete_resource,
        crate::api::server_status,
        crate::api::list_devices,
        crate::api::create_device,
        crate::api::import_devices,
        crate::api::bulk_devices,
        crate::api::export_devices,
        crate::api::get_device,
        crate::api::patch_device,
        crate::api::delete_device,
        crate::api::list_firmware,
        crate::api::upload_firmware,
        crate::api::get_firmware,
        crate::api::delete_firmware,
        crate::api::download_firmware,
        crate::builds::create,
        crate::builds::list,
        crate::builds::show,
        crate::builds::image,
        crate::rollouts::list,
        crate::rollouts::create,
        crate::rollouts::show,
        crate::rollouts::members,
        crate::rollouts::act,
        crate::rollouts::events,
        crate::rollouts::audit,
    ),
    components(schemas(
        ErrorBody,
        m::Product,
        m::Group,
        m::Device,
        m::DeviceStatus,
        m::Telemetry,
        m::Firmware,
        m::Resource,
        m::TokenInfo,
        m::User,
        m::Role,
        m::BuildStatus,
        m::Diagnostic,
        m::StageSize,
        m::StageSpec,
        m::RolloutTarget,
        m::RolloutState,
        m::MemberState,
        m::DeviceEvent,
        m::AuditEntry,
        m::DeviceSort,
        m::ImportOutcome,
    ))
)]
pub struct ApiDoc;

pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_with_its_refusals() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.len() >= 20, "{}", paths.len());
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                let responses = op["responses"].as_object().unwrap();
                assert!(
                    responses.keys().any(|s| s.starts_with('2')),
                    "{method} {path} has no success"
                );
                assert!(
                    responses.contains_key("400") && responses.contains_key("422"),
                    "{method} {path} lacks the refusals"
                );
            }
        }
    }
}
