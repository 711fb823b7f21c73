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
            }
        }
    })
}

pub async fn document() -> Json<Value> {
    Json(spec())
}
