// Package replicate moves the data: the initial copy, the incremental sync of
// captured changes, the final sync inside the pause, and verification.
//
// # Load strategy
//
// Per-row index upkeep and foreign key checks dominate a bulk load into an
// indexed table. Like pg_restore, the engine loads into bare tables and builds
// the indexes afterwards:
//
//  1. Prepare (one transaction on the target): record every foreign key,
//     primary key, unique and exclusion constraint, plain index and enabled
//     user trigger of the synced tables in the library's undo table, then drop
//     them (triggers: disable), and truncate the tables.
//  2. Copy every table from one exported snapshot of the source, with the COPY
//     protocol streamed through pgconn (memory is a pipe, flat whatever the
//     size), tables and page ranges of large tables in parallel.
//  3. Rebuild primary keys, unique and exclusion constraints and indexes, in
//     parallel, each with the removal of its undo record in one transaction.
//  4. Incremental rounds while the service runs (see below).
//  5. Final round, inside the pause: the last changes, sequences, foreign keys
//     re-added NOT VALID (a catalog change: instant), triggers re-enabled.
//  6. After the switch: VALIDATE CONSTRAINT for each foreign key, which checks
//     the existing rows without blocking the application's writes.
//
// Foreign keys stay off on the target from step 1 to step 5. The target is
// written only by the engine until the switch, and each round leaves it equal
// to the source as of that round's snapshot, which satisfied the keys; so the
// keys hold when they come back, and meanwhile rounds never need an order,
// never trip on a cycle and never cascade.
//
// # Incremental rounds
//
// A round reads a bounded batch of captured keys (the oldest first) in a
// REPEATABLE READ transaction on the source, fetches the current rows for
// those keys in the same snapshot, and in one target transaction deletes the
// keys and inserts the fetched rows. Deleting first makes every in-round case
// correct without a special path: a changed key, a unique value moved to
// another row or swapped between two, a row deleted and re-inserted. After the
// target commits, the source transaction deletes the consumed change rows;
// under REPEATABLE READ that DELETE sees exactly the rows the round read, and
// changes committed meanwhile stay for the next round. A crash between the
// two commits re-applies the batch, which is idempotent.
//
// All sessions pin their settings (sessionParams): COPY's text form
// round-trips every value exactly, row level security cannot hide rows, and
// the role's default isolation level does not matter.
//
// Every statement names its table with ONLY (COPY TO reads only the named
// table by definition): a statement on an inheritance parent must never
// reach its children, which are synced (or excluded) as tables of their own.
package replicate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/pgswo/swo/internal/capture"
	"github.com/pgswo/swo/internal/schema"
)

// Engine moves the data of a set of tables from a source to a target database.
type Engine struct {
	Src, Dst *pgx.ConnConfig // connection settings; application_name set by the caller
	SourceID uuid.UUID       // the source's database identity
	Schema   string          // the library's schema, in both databases
	Source   *schema.Database
	Target   *schema.Database
	Workers  int // parallel streams; default 4
	Log      *slog.Logger
	Progress *Progress

	// MaintenanceWorkMem is set on index-building sessions. Default "128MB".
	MaintenanceWorkMem string

	// FinalTimeout bounds each statement of the final sync on the target,
	// and its lock waits on the source after the change table's. Default 10s.
	FinalTimeout time.Duration
	// LockBudget bounds the final sync's wait for the writers that captured
	// a change to finish (the service is paused meanwhile). 0: no bound of
	// its own.
	LockBudget time.Duration

	// Keep names target tables (schema.name) whose rows equalled the
	// source's before the run: they are reloaded in one transaction each
	// rather than emptied up front, so that an abort leaves them filled.
	Keep map[string]bool

	// Shape is the source's shape (schema.Shape) as the run was planned
	// from, read with ShapeSQL and Exclude; Final refuses to switch if it
	// changed.
	Shape    schema.Shape
	ShapeSQL string
	Exclude  []string
	// RefusedNow, if set, selects the refused kinds of objects the source
	// holds now (schema.Database.RefusedNowSQL): Final refuses to switch if
	// one appeared during the run.
	RefusedNow string
	// Guard, if set, is a query returning true while this run may still write
	// (its leader holds the execution lock). Rounds and the initial copy run
	// it in their source transaction and stop if it is false, so that a run
	// overtaken by RESET cannot touch the next run's data.
	Guard string

	// applied counts the transactions this run committed on the target
	// (copy units, rounds); each also adds one to the target's own count
	// (bumpSQL). The final sync compares the two inside the pause: a target
	// that lost committed work (failed over to a standby that lagged, or
	// restored) has fewer, and the run must not switch, since the source
	// already consumed those changes.
	applied atomic.Int64
	// premade are the partitions created during the run that FindPremade
	// found, for the final sync to lock, check and create in the target.
	premade []newPartition
}

// ErrOvertaken is returned when the Guard says the run may no longer write.
var ErrOvertaken = errors.New("this run was overtaken (RESET, or the cluster failed it): it stops")

// ErrRefusedAppeared is returned by Final when the source holds a kind of
// object the preconditions refuse that was not there when they were checked.
var ErrRefusedAppeared = errors.New("objects that swo cannot move appeared in the old database during the run; RESET (which names them) and EXECUTE again once they are gone")

// ErrSchemaChanged is returned by Final when the source's tables or capture
// triggers changed during the run.
// ErrTargetLost is returned by Final when the new database no longer holds
// every transaction the run committed there.
var ErrTargetLost = errors.New("the new database lost changes the run had committed there (did it fail over to a standby that lagged, or was it restored?): " +
	"the switch is refused, the service stays on the old database; RESET and EXECUTE again")

var ErrSchemaChanged = errors.New("the old database's tables or change-capture triggers changed during the run (DDL?): changes may have escaped capture; RESET and EXECUTE again")

// guard runs the Guard in q.
func (e *Engine) guard(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}) error {
	if e.Guard == "" {
		return nil
	}
	var ok bool
	if err := q.QueryRow(ctx, e.Guard).Scan(&ok); err != nil {
		return err
	}
	if !ok {
		return ErrOvertaken
	}
	return nil
}

// sessionParams are the settings of every sync session. The key settings
// (capture.KeySettings) make COPY's text form round-trip every value exactly
// and parse captured keys as the trigger rendered them. The others make the
// role's or the database's defaults irrelevant: row_security off turns a
// policy that would silently hide rows into an error (the preconditions
// refuse such a table first), READ COMMITTED is what every statement that
// waits for a lock needs (a REPEATABLE READ default would take its snapshot
// before the wait), the library bounds its own waits, and JIT compilation
// (which can cost more than the fingerprint query it would compile, inside
// the pause) is off.
var sessionParams = func() map[string]string {
	p := map[string]string{
		"client_encoding":                     "UTF8",
		"row_security":                        "off",
		"default_transaction_isolation":       "read committed",
		"statement_timeout":                   "0",
		"lock_timeout":                        "0",
		"idle_in_transaction_session_timeout": "0",
		"jit":                                 "off", // the library's queries are short; compiling them would cost more
	}
	for _, kv := range capture.KeySettings {
		p[kv[0]] = kv[1]
	}
	return p
}()

// Connect opens a session with the pinned settings.
func Connect(ctx context.Context, cfg *pgx.ConnConfig) (*pgx.Conn, error) {
	c := cfg.Copy()
	for k, v := range sessionParams {
		c.RuntimeParams[k] = v
	}
	return connectPlain(ctx, c)
}

// connectPlain opens a session with the role's and database's own settings
// (for work whose result may depend on them, as a materialized view's).
func connectPlain(ctx context.Context, cfg *pgx.ConnConfig) (*pgx.Conn, error) {
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to %s@%s:%d/%s: %w", cfg.User, cfg.Host, cfg.Port, cfg.Database, err)
	}
	return conn, nil
}

func (e *Engine) workers() int {
	if e.Workers <= 0 {
		return 4
	}
	return e.Workers
}

func (e *Engine) log() *slog.Logger {
	if e.Log == nil {
		return slog.Default()
	}
	return e.Log
}

func (e *Engine) progress() *Progress {
	if e.Progress == nil {
		e.Progress = &Progress{}
	}
	return e.Progress
}

func (e *Engine) capture() capture.Capture { return capture.Capture{Schema: e.Schema} }

// q quotes a name in the library's schema.
func (e *Engine) q(name string) string { return pgx.Identifier{e.Schema, name}.Sanitize() }

// target returns the target's table of the same name as the source table t.
func (e *Engine) target(t *schema.Table) *schema.Table { return e.Target.Table(t.String()) }

// columnList renders the writable columns of t (name order) for SQL.
func columnList(cols []schema.Column, prefix string) string {
	s := ""
	for i, c := range cols {
		if i > 0 {
			s += ", "
		}
		s += prefix + pgx.Identifier{c.Name}.Sanitize()
	}
	return s
}

// pkTypes returns the types of t's primary key columns, in key order.
func pkTypes(t *schema.Table) []string {
	out := make([]string, len(t.PrimaryKey))
	for i, name := range t.PrimaryKey {
		c, _ := t.Column(name)
		out[i] = c.Type
	}
	return out
}

// feed sends items on work, then closes it; it stops early if ctx ends. It is
// the producer of the package's bounded worker pools.
func feed[T any](ctx context.Context, work chan<- T, items []T) error {
	defer close(work)
	for _, it := range items {
		select {
		case work <- it:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}
