//! The OpenAPI 3.1 document of the HTTP API, served at `GET /api/openapi.json`.
//!
//! It is not written by hand: every route is registered through
//! `utoipa_axum::routes!` from the `#[utoipa::path]` annotation on its handler
//! (see `super::router`), and the reply bodies are the very types the
//! handlers serialize, so a route or a field cannot exist in the code without
//! appearing here. This module adds what belongs to the document as a whole
//! (title, tags, the bearer schemes) and the schemas of the domain types,
//! whose JSON form is hand-made (a number is an integer or `"00"`).

use std::borrow::Cow;

use axum::Extension;
use axum::body::Bytes;
use axum::http::{HeaderValue, header};
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::openapi::schema::{
    ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi as Document, RefOr};
use utoipa::{IntoResponses, Modify, OpenApi, PartialSchema, ToSchema};

use crate::domain::{History, MAX_KEY_CHARS, Number, RoomKey};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "croupier",
        description = "Realtime backend for shared roulette rooms. Room events travel over the \
                       WebSocket at /ws (see docs/protocol.md); this document covers the HTTP API."
    ),
    tags(
        (name = "rooms", description = "Read, change and list rooms (\"sessions\" in the paths)"),
        (name = "auth", description = "Room passwords and room tokens"),
        (name = "admin", description = "Cluster-wide administration (ADMIN_TOKEN)"),
        (name = "operations", description = "Health, readiness, metrics, this document"),
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerSchemes)
)]
pub struct ApiDoc;

/// The body of every error reply.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody<'a> {
    /// Always `false`.
    pub success: bool,
    /// A sentence for people; branch on the status code.
    #[schema(value_type = String)]
    pub error: Cow<'a, str>,
}

/// The refusals every write can meet: `POST /api/roulette/save`,
/// `PUT /api/roulette/{key}` and `POST /api/rooms/auth`. `ApiError` produces
/// them; this type only documents them.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum WriteRefusals {
    /// Invalid body, key, value or id; a full room
    #[response(status = 400)]
    BadRequest(ErrorBody<'static>),
    /// Protected room without a valid token, or a wrong room password
    #[response(status = 401)]
    Unauthorized(ErrorBody<'static>),
    /// Body over MAX_BODY_BYTES
    #[response(status = 413)]
    TooLarge(ErrorBody<'static>),
    /// Body not sent as application/json
    #[response(status = 415)]
    NotJson(ErrorBody<'static>),
    /// The client's quota is used up
    #[response(status = 429, headers(("Retry-After" = u64, description = "Seconds to wait")))]
    RateLimited(ErrorBody<'static>),
    /// Database unavailable (nothing was stored), or too many password checks waiting
    #[response(status = 503)]
    Unavailable(ErrorBody<'static>),
}

/// The refusals of the admin API.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum AdminRefusals {
    /// Wrong admin token
    #[response(status = 401)]
    Unauthorized(ErrorBody<'static>),
    /// The admin API is disabled (no ADMIN_TOKEN), or what was asked for does not exist
    #[response(status = 404)]
    NotFound(ErrorBody<'static>),
    /// Database or bus unavailable
    #[response(status = 503)]
    Unavailable(ErrorBody<'static>),
}

/// Room tokens and the admin token are both bearer tokens.
struct BearerSchemes;

impl Modify for BearerSchemes {
    fn modify(&self, openapi: &mut Document) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, description) in [
            (
                "room_token",
                "A room token from POST /api/rooms/auth (protected rooms only)",
            ),
            ("admin_token", "The operator's ADMIN_TOKEN"),
        ] {
            let scheme = HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(description))
                .build();
            components.add_security_scheme(name, SecurityScheme::Http(scheme));
        }
    }
}

impl PartialSchema for Number {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(SchemaType::Type(Type::Integer))
                    .minimum(Some(0))
                    .maximum(Some(36)),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(SchemaType::Type(Type::String))
                    .enum_values(Some(["00"])),
            )
            .description(Some(
                "A pocket of the wheel: 0 to 36, or \"00\" (American double zero)",
            ))
            .into()
    }
}

impl ToSchema for Number {}

impl PartialSchema for RoomKey {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::String))
            .min_length(Some(1))
            .max_length(Some(MAX_KEY_CHARS))
            // No control characters or `/`, no whitespace at either end.
            .pattern(Some(
                r"^[^\x00-\x20\x7f/]([^\x00-\x1f\x7f/]*[^\x00-\x20\x7f/])?$",
            ))
            .description(Some(
                "A room key: 1 to 100 characters, no control characters, no '/', no leading \
                 or trailing whitespace; 'sessions' and 'save' are reserved",
            ))
            .into()
    }
}

impl ToSchema for RoomKey {}

impl PartialSchema for History {
    fn schema() -> RefOr<Schema> {
        ArrayBuilder::new()
            .items(RefOr::Ref(utoipa::openapi::Ref::from_schema_name("Number")))
            .description(Some("Spun numbers, oldest first (at most MAX_HISTORY)"))
            .into()
    }
}

impl ToSchema for History {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("History")
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((Number::name().into_owned(), Number::schema()));
    }
}

/// The rendered document, shared by every request for it.
#[derive(Clone)]
pub struct Rendered(pub Bytes);

/// `GET /api/openapi.json`
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "operations",
    responses((status = 200, description = "This document (OpenAPI 3.1)", content_type = "application/json", body = Object))
)]
pub async fn document(Extension(Rendered(body)): Extension<Rendered>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
}
