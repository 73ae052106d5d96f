-- n-kudo control plane schema, version 3 (SQLite): rollouts (ARCHITECTURE §4.6). Expand-only.
-- Kept column-for-column equal to migrations/postgres/0003_rollouts.sql.

CREATE TABLE rollouts (
    id TEXT PRIMARY KEY,
    name TEXT,
    version TEXT NOT NULL,
    previous_version TEXT,
    policy_text TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('running', 'paused', 'waiting-approval', 'completed', 'rolled-back', 'aborted')),
    -- Index of the stage in progress (a paused rollout keeps evaluating triggers but takes no step forward).
    current_stage BIGINT NOT NULL DEFAULT 0,
    -- Index of the stage whose manual gate an operator approved (-1: none).
    approved_stage BIGINT NOT NULL DEFAULT -1,
    -- Per trigger name: its TriggerState, last observation and verdict (JSON).
    triggers_json TEXT NOT NULL DEFAULT '{}',
    -- Per trigger name: the value measured before the rollout started (compare = baseline).
    baseline_json TEXT NOT NULL DEFAULT '{}',
    metrics_source TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    finished_at BIGINT
);
CREATE INDEX idx_rollouts_state ON rollouts (state, created_at);

CREATE TABLE rollout_stages (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
    idx BIGINT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'switching', 'baking', 'waiting-approval', 'done', 'rolled-back')),
    started_at BIGINT,
    bake_until BIGINT,
    completed_at BIGINT,
    PRIMARY KEY (rollout_id, idx)
);

-- Every agent a rollout touched (selected by a started stage), with the version it ran before.
CREATE TABLE rollout_agents (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
    agent_id TEXT NOT NULL,
    stage_idx BIGINT NOT NULL,
    site_id TEXT NOT NULL,
    bucket BIGINT NOT NULL,
    previous_version TEXT NOT NULL,
    switched_at BIGINT,
    PRIMARY KEY (rollout_id, agent_id)
);
-- The controller reads a stage's members still switching, and the next ones in switching order.
CREATE INDEX idx_rollout_agents_stage ON rollout_agents (rollout_id, stage_idx, switched_at, bucket, agent_id);

-- Append-only, hash-chained per rollout.
CREATE TABLE rollout_decisions (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    kind TEXT NOT NULL,
    stage TEXT,
    trigger_name TEXT,
    query TEXT,
    values_json TEXT NOT NULL,
    action TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (rollout_id, seq)
);

-- Leases for singleton background work across replicas (the rollout controller).
CREATE TABLE controller_leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);

-- Enrollment attempts by result, for the builtin metrics source (pruned after 7 days).
CREATE TABLE enrollment_attempts (
    at BIGINT NOT NULL,
    result TEXT NOT NULL
);
CREATE INDEX idx_enrollment_attempts_at ON enrollment_attempts (at);

-- The agent version that ran each execution (plan failure rate by version).
ALTER TABLE executions ADD COLUMN agent_version TEXT;
CREATE INDEX idx_executions_completed ON executions (completed_at);
-- Statistics by agent version (the builtin metrics source).
CREATE INDEX idx_agents_version ON agents (agent_version);
