//! The OpenAPI 3.1 document of the management API, served at `/api/v1/openapi.json`.

use axum::Json;
use serde_json::{Value, json};

fn op(summary: &str, ok: &str) -> Value {
    json!({
        "summary": summary,
        "security": [{ "bearer": [] }],
        "responses": {
            ok: { "description": "success" },
            "400": { "$ref": "#/components/responses/Error" },
            "401": { "$ref": "#/components/responses/Error" },
            "404": { "$ref": "#/components/responses/Error" }
        }
    })
}

fn with_body(mut op: Value, schema: Value) -> Value {
    op["requestBody"] = json!({
        "required": true,
        "content": { "application/json": { "schema": schema } }
    });
    op
}

fn with_octets(mut op: Value) -> Value {
    op["requestBody"] = json!({
        "required": true,
        "content": { "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } }
    });
    op["responses"]["413"] = json!({ "$ref": "#/components/responses/Error" });
    op["responses"]["422"] = json!({ "$ref": "#/components/responses/Error" });
    op
}

fn params(mut op: Value, names: &[(&str, &str, &str)]) -> Value {
    op["parameters"] = names
        .iter()
        .map(|(name, place, ty)| {
            json!({ "name": name, "in": place, "required": *place == "path", "schema": { "type": ty } })
        })
        .collect();
    op
}

pub fn spec() -> Value {
    let id = "integer";
    let product = [("product", "path", id)];
    let group = [("product", "path", id), ("group", "path", id)];
    let device = [("product", "path", id), ("serial", "path", "string")];
    let firmware = [("product", "path", id), ("firmware", "path", id)];
    let resource = [
        ("product", "path", id),
        ("group", "path", id),
        ("resource", "path", id),
    ];
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "OTAForge management API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Products, groups, devices, firmware and resources of an OTAForge server. Every route but login and this document needs `Authorization: Bearer <token>`. Errors are `{\"error\": \"message\"}`."
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "responses": {
                "Error": {
                    "description": "an error with a message",
                    "content": { "application/json": { "schema": {
                        "type": "object", "required": ["error"],
                        "properties": { "error": { "type": "string" } }
                    } } }
                }
            }
        },
        "paths": {
            "/api/v1/auth/login": { "post": {
                "summary": "exchange a username and password for a bearer token",
                "requestBody": { "required": true, "content": { "application/json": { "schema": {
                    "type": "object", "required": ["username", "password"],
                    "properties": { "username": { "type": "string" }, "password": { "type": "string" } }
                } } } },
                "responses": { "201": { "description": "{\"token\"}" }, "401": { "$ref": "#/components/responses/Error" } }
            } },
            "/api/v1/products": {
                "get": op("list products", "200"),
                "post": with_body(op("create a product (returns its API key, shown once)", "201"),
                    json!({ "type": "object", "required": ["name"], "properties": { "name": { "type": "string" } } }))
            },
            "/api/v1/products/{product}": {
                "get": params(op("get a product", "200"), &product),
                "delete": params(op("delete a product and everything in it", "204"), &product)
            },
            "/api/v1/products/{product}/rotate-key": {
                "post": params(op("replace the product's API key", "200"), &product)
            },
            "/api/v1/products/{product}/groups": {
                "get": params(op("list groups", "200"), &product),
                "post": params(with_body(op("create a group", "201"),
                    json!({ "type": "object", "required": ["name"], "properties": { "name": { "type": "string" } } })), &product)
            },
            "/api/v1/products/{product}/groups/{group}": {
                "get": params(op("get a group", "200"), &group),
                "patch": params(with_body(op("assign firmware or config, or rename", "200"),
                    json!({ "type": "object", "properties": {
                        "name": { "type": "string" },
                        "firmware_id": { "type": ["integer", "null"] },
                        "config": { "type": "object" }
                    } })), &group),
                "delete": params(op("delete a group (not Default); its devices move to Default", "204"), &group)
            },
            "/api/v1/products/{product}/groups/{group}/resources": {
                "get": params(op("list the group's resource files", "200"), &group),
                "post": params(with_octets(op("upload a resource file (?name=FILE)", "201")),
                    &[("product", "path", id), ("group", "path", id), ("name", "query", "string")])
            },
            "/api/v1/products/{product}/groups/{group}/resources/{resource}": {
                "delete": params(op("delete a resource file", "204"), &resource)
            },
            "/api/v1/products/{product}/devices": {
                "get": params(op("list devices", "200"), &product),
                "post": params(with_body(op("register a device (Verified); the answer carries its static firmware_url", "201"),
                    json!({ "type": "object", "required": ["serial"], "properties": {
                        "serial": { "type": "string" },
                        "group_id": { "type": "integer" },
                        "password": { "type": "string" },
                        "status": { "enum": ["new", "verified", "blocked", "disabled"] }
                    } })), &product)
            },
            "/api/v1/products/{product}/devices/{serial}": {
                "get": params(op("get a device", "200"), &device),
                "patch": params(with_body(op("change status, group or password", "200"),
                    json!({ "type": "object", "properties": {
                        "status": { "enum": ["new", "verified", "blocked", "disabled"] },
                        "group_id": { "type": "integer" },
                        "password": { "type": ["string", "null"] }
                    } })), &device),
                "delete": params(op("delete a device", "204"), &device)
            },
            "/api/v1/products/{product}/firmware": {
                "get": params(op("list firmware", "200"), &product),
                "post": params(with_octets(op("upload firmware; the version comes from the image unless ?version is given", "201")),
                    &[("product", "path", id), ("version", "query", "string")])
            },
            "/api/v1/products/{product}/firmware/{firmware}": {
                "get": params(op("get firmware metadata", "200"), &firmware),
                "delete": params(op("delete firmware not assigned to any group", "204"), &firmware)
            },
            "/api/v1/products/{product}/firmware/{firmware}/download": {
                "get": params(op("download the firmware file (Range supported)", "200"), &firmware)
            },
            "/api/v1/builds": {
                "post": with_body(op("queue a compile; the result is assigned to the device when one is named", "202"),
                    json!({ "type": "object", "required": ["fqbn", "files"], "properties": {
                        "fqbn": { "type": "string", "examples": ["arduino:avr:uno", "esp32:esp32:esp32"] },
                        "files": { "type": "object", "additionalProperties": { "type": "string" } },
                        "product_id": { "type": "integer" },
                        "device": { "type": "string", "description": "serial of the device in product_id" }
                    } }))
            },
            "/api/v1/builds/{id}": {
                "get": params(op("a build: status (queued, running, succeeded, failed), log, diagnostics, firmware_id", "200"),
                    &[("id", "path", id)])
            },
            "/api/v1/products/{product}/rollouts": {
                "get": params(op("list rollouts with per-stage counts", "200"), &product),
                "post": params(with_body(op("start a staged rollout (or preview it with dry_run: who is in each stage, bytes to move)", "201"),
                    json!({ "type": "object", "required": ["firmware_id", "stages"], "properties": {
                        "firmware_id": { "type": "integer" },
                        "target": { "type": "object", "properties": {
                            "group_id": { "type": "integer" },
                            "status": { "enum": ["new", "verified", "blocked", "disabled"] },
                            "version": { "type": "string" }
                        } },
                        "stages": { "type": "array", "items": { "type": "object", "required": ["size"], "properties": {
                            "size": { "oneOf": [
                                { "type": "object", "properties": { "count": { "type": "integer", "minimum": 1 } } },
                                { "type": "object", "properties": { "percent": { "type": "number" } } },
                                { "const": "rest" }
                            ] },
                            "success_threshold": { "type": "number", "default": 0.95 },
                            "failure_threshold": { "type": "number", "default": 0.1 },
                            "window_secs": { "type": "integer", "default": 0 },
                            "auto_advance": { "type": "boolean", "default": true },
                            "auto_rollback": { "type": "boolean", "default": false }
                        } } },
                        "rate_per_minute": { "type": "integer", "minimum": 1 },
                        "dry_run": { "type": "boolean" },
                        "seed": { "type": "string", "description": "orders the fleet into stages; same request, same stages" }
                    } })), &product)
            },
            "/api/v1/products/{product}/rollouts/{rollout}": {
                "get": params(op("a rollout with per-stage counts", "200"), &[("product", "path", id), ("rollout", "path", id)])
            },
            "/api/v1/products/{product}/rollouts/{rollout}/devices": {
                "get": params(op("each member's stage and state", "200"), &[("product", "path", id), ("rollout", "path", id)])
            },
            "/api/v1/products/{product}/rollouts/{rollout}/{action}": {
                "post": params(op("pause, resume, approve or cancel", "200"),
                    &[("product", "path", id), ("rollout", "path", id), ("action", "path", "string")])
            },
            "/api/v1/products/{product}/devices/{serial}/events": {
                "get": params(op("the device's update timeline (offered, downloaded, installed, rolled back, feedback)", "200"), &device)
            },
            "/api/v1/audit": {
                "get": op("who did what, newest first", "200")
            }
        }
    })
}

pub async fn document() -> Json<Value> {
    Json(spec())
}
