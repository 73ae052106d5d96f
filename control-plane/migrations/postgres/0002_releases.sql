-- n-kudo control plane schema, version 2 (Postgres): the release registry, desired agent versions, upgrade
-- outcomes and the agents' self-update state (ARCHITECTURE §3, §4.7). Expand-only.
-- Kept column-for-column equal to migrations/sqlite/0002_releases.sql.

CREATE TABLE releases (
    version TEXT PRIMARY KEY,
    channel TEXT NOT NULL CHECK (channel IN ('release', 'pre-release')),
    -- The manifest exactly as signed, and its minisign signature file.
    manifest TEXT NOT NULL,
    signature TEXT NOT NULL,
    key_id TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    external_base_url TEXT,
    published_at BIGINT NOT NULL,
    -- Set by a rollout that rolled this version back: never offered again until an operator clears it.
    bad BIGINT NOT NULL DEFAULT 0,
    bad_reason TEXT,
    bad_at BIGINT
);

CREATE TABLE release_artifacts (
    version TEXT NOT NULL REFERENCES releases(version) ON DELETE CASCADE,
    name TEXT NOT NULL,
    component TEXT NOT NULL,
    kind TEXT NOT NULL,
    os TEXT NOT NULL,
    arch TEXT NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    -- The bytes, once uploaded and checked against size and sha256 (NULL: not uploaded).
    content BYTEA,
    uploaded_at BIGINT,
    PRIMARY KEY (version, name)
);

-- Desired agent versions per scope; target is '' for the fleet. An empty version is a cleared entry (kept so
-- that other replicas see the change through set_at).
CREATE TABLE desired_versions (
    scope TEXT NOT NULL CHECK (scope IN ('fleet', 'ring', 'site', 'agent')),
    target TEXT NOT NULL,
    version TEXT NOT NULL,
    rollback BIGINT NOT NULL DEFAULT 0,
    set_by TEXT NOT NULL,
    set_at BIGINT NOT NULL,
    PRIMARY KEY (scope, target)
);
CREATE INDEX idx_desired_versions_set_at ON desired_versions (set_at);

-- One row per finished self-update attempt (committed, rolled-back or failed), counted once.
CREATE TABLE agent_upgrades (
    agent_id TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    from_version TEXT,
    to_version TEXT NOT NULL,
    result TEXT NOT NULL,
    error TEXT,
    attempt_started_at TEXT NOT NULL,
    recorded_at BIGINT NOT NULL,
    UNIQUE (agent_id, to_version, attempt_started_at)
);
CREATE INDEX idx_agent_upgrades_to ON agent_upgrades (to_version, recorded_at);

ALTER TABLE agents ADD COLUMN build_version TEXT;
ALTER TABLE agents ADD COLUMN update_json TEXT;
ALTER TABLE agents ADD COLUMN update_restarts BIGINT NOT NULL DEFAULT 0;
