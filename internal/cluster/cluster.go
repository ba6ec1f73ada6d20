// Package cluster keeps the list of nodes (service instances in switchover
// mode) in the old database: each node upserts its row every heartbeat, and
// every node reads the list to show it, to check that all nodes agree on the
// databases, and to choose the leader of an execution.
//
// Liveness is judged by the database's clock (now() - seen_at), never by
// comparing clocks of different machines. A node that misses Timeout worth
// of heartbeats is not alive: it does not count for EXECUTE's checks, and if
// it was leading a run, the other nodes fail the run.
package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// Node is one node's row.
type Node struct {
	ID          uuid.UUID
	Name        string
	Version     string
	CanExec     bool
	OldID       uuid.UUID
	NextID      uuid.UUID
	ConfigError string // the node's own configuration error, if any
	Agreed      string // the settings every node must share, as text (see Problems)
	StartedAt   time.Time
	SeenAt      time.Time
	Alive       bool            // seen within the timeout given to List, by the database's clock
	Status      json.RawMessage // what the node reports about itself (routing, progress, …)
}

// Table is the nodes table of one namespace.
type Table struct {
	Name string // qualified, quoted
}

// DDL creates the table.
func (t Table) DDL() string {
	return fmt.Sprintf(`CREATE TABLE IF NOT EXISTS %[1]s (
	id           uuid PRIMARY KEY,
	name         text NOT NULL,
	version      text NOT NULL,
	can_exec     boolean NOT NULL,
	old_id       uuid,
	next_id      uuid,
	config_error text NOT NULL DEFAULT '',
	started_at   timestamptz NOT NULL DEFAULT now(),
	seen_at      timestamptz NOT NULL DEFAULT now(),
	status       jsonb NOT NULL DEFAULT '{}'
);
ALTER TABLE %[1]s ADD COLUMN IF NOT EXISTS agreed text NOT NULL DEFAULT ''`, t.Name)
}

// Beat records that the node is alive, with its current self-report.
func (t Table) Beat(ctx context.Context, conn *pgx.Conn, n Node, status any) error {
	raw, err := json.Marshal(status)
	if err != nil {
		return err
	}
	_, err = conn.Exec(ctx, `INSERT INTO `+t.Name+` (id, name, version, can_exec, old_id, next_id, config_error, status, agreed)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (id) DO UPDATE SET name = $2, version = $3, can_exec = $4, old_id = $5, next_id = $6, config_error = $7,
	status = $8, agreed = $9, seen_at = now()`,
		n.ID, n.Name, n.Version, n.CanExec, nullID(n.OldID), nullID(n.NextID), n.ConfigError, raw, n.Agreed)
	return err
}

func nullID(id uuid.UUID) any {
	if id == uuid.Nil {
		return nil
	}
	return id
}

// List returns every node, alive or not, ordered by name then id.
func (t Table) List(ctx context.Context, conn *pgx.Conn, timeout time.Duration) ([]Node, error) {
	rows, err := conn.Query(ctx, `SELECT id, name, version, can_exec, old_id, next_id, config_error, started_at, seen_at,
	now() - seen_at < $1::interval, status, agreed FROM `+t.Name+` ORDER BY name, id`, fmt.Sprintf("%d milliseconds", timeout.Milliseconds()))
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Node, error) {
		var n Node
		var old, next *uuid.UUID
		err := r.Scan(&n.ID, &n.Name, &n.Version, &n.CanExec, &old, &next, &n.ConfigError, &n.StartedAt, &n.SeenAt, &n.Alive, &n.Status, &n.Agreed)
		if old != nil {
			n.OldID = *old
		}
		if next != nil {
			n.NextID = *next
		}
		return n, err
	})
}

// Remove deletes a node's row (on a clean shutdown).
func (t Table) Remove(ctx context.Context, conn *pgx.Conn, id uuid.UUID) error {
	_, err := conn.Exec(ctx, "DELETE FROM "+t.Name+" WHERE id = $1", id)
	return err
}

// Prune deletes the rows of nodes not seen for longer than timeout.
func (t Table) Prune(ctx context.Context, conn *pgx.Conn, timeout time.Duration) error {
	_, err := conn.Exec(ctx, "DELETE FROM "+t.Name+" WHERE now() - seen_at >= $1::interval", fmt.Sprintf("%d milliseconds", timeout.Milliseconds()))
	return err
}

// Problems returns, for each alive node, why its configuration is not valid
// ("" when it is): its own error, or a disagreement between nodes on the
// database their --db-url-next reaches (compared by identity, never by URL)
// or on the settings that must be equal on every node (Agreed: what moves,
// for one; the leader's setting would otherwise silently decide).
func Problems(nodes []Node) map[uuid.UUID]string {
	out := map[uuid.UUID]string{}
	var valid []Node
	for _, n := range nodes {
		if n.Alive && n.ConfigError == "" {
			valid = append(valid, n)
		}
	}
	var disagree []string
	if d := disagreement(valid, func(n Node) string { return n.NextID.String() }); d != "" {
		disagree = append(disagree, "nodes disagree on the next database ("+d+"): start every instance with the same --db-url-next")
	}
	if d := disagreement(valid, func(n Node) string { return n.Agreed }); d != "" {
		disagree = append(disagree, "nodes disagree on settings that must be equal ("+d+"): configure every instance alike")
	}
	for _, n := range nodes {
		if !n.Alive {
			continue
		}
		switch {
		case n.ConfigError != "":
			out[n.ID] = n.ConfigError
		default:
			out[n.ID] = strings.Join(disagree, "; ")
		}
	}
	return out
}

// disagreement describes the groups of nodes by key, or "" if they all
// share one. Each group's names are sorted, and the groups too, so that
// every node writes the same text.
func disagreement(nodes []Node, key func(Node) string) string {
	groups := map[string][]string{}
	for _, n := range nodes {
		groups[key(n)] = append(groups[key(n)], n.Name)
	}
	if len(groups) < 2 {
		return ""
	}
	var parts []string
	for k, names := range groups {
		sort.Strings(names)
		if k == "" {
			k = "(none)"
		}
		parts = append(parts, fmt.Sprintf("%s -> %s", strings.Join(names, ", "), k))
	}
	sort.Strings(parts)
	return strings.Join(parts, "; ")
}

// ErrNoLeader is returned when no alive node may execute.
var ErrNoLeader = errors.New("no node that may execute is alive (every instance is API-only?)")

// Leader chooses the node that leads an execution: preferred (the node
// EXECUTE was called on) if it is alive and may execute, otherwise the alive
// executing-capable node with the lowest id. Every node computing it from
// the same list gets the same answer.
func Leader(nodes []Node, preferred uuid.UUID) (uuid.UUID, error) {
	var best uuid.UUID
	found := false
	for _, n := range nodes {
		if !n.Alive || !n.CanExec {
			continue
		}
		if n.ID == preferred {
			return n.ID, nil
		}
		if !found || strings.Compare(n.ID.String(), best.String()) < 0 {
			best, found = n.ID, true
		}
	}
	if !found {
		return uuid.Nil, ErrNoLeader
	}
	return best, nil
}
