// Package msglog is the totally ordered message log in the old database that
// every node of a switchover cluster reads to derive the same state.
//
// Order. Appends serialise on a transaction-scoped advisory lock and take the
// next id (max + 1) in a statement that starts after the lock is granted, so
// ids are dense and commit in id order: a reader that has seen id n has seen
// every id below n, and reading "id > last" never skips a message.
//
// Delivery. Each append sends a NOTIFY on the namespace's channel in the same
// transaction, delivered at commit; nodes LISTEN to wake at once and poll as
// a fallback, so a lost notification costs one poll interval.
//
// Growth. A RESET starts a new run and deletes the messages of older runs in
// the same transaction; a run appends a few dozen messages. Heartbeats and
// progress do not go through the log (see package cluster).
package msglog

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// Message kinds.
const (
	KindReset     = "reset"     // a RESET began: a new run
	KindIdle      = "idle"      // the RESET finished and every check passed
	KindExecute   = "execute"   // EXECUTE: Data names the leader
	KindPause     = "pause"     // the leader starts the stop-the-world window
	KindExecuting = "executing" // the leader holds the connection lock: final sync and commit
	KindDone      = "done"      // the switch committed (appended in the committing transaction)
	KindFailed    = "failed"    // the run failed; Data holds the error
	KindConfirm   = "confirm"   // a node reports it routes to the new database
)

// Message is one entry of the log.
type Message struct {
	ID   int64
	At   time.Time // database clock
	Node uuid.UUID
	Kind string
	Run  int64 // id of the reset message that started the run; 0 before any
	Data json.RawMessage
}

// Decode unmarshals the message's data into v.
func (m Message) Decode(v any) error {
	if len(m.Data) == 0 {
		return nil
	}
	return json.Unmarshal(m.Data, v)
}

// Log is the message log of one namespace.
type Log struct {
	Table   string   // qualified, quoted table name
	Channel string   // NOTIFY channel (quoted identifier)
	Lock    [2]int32 // advisory lock serialising appends
}

// DDL creates the log's table.
func (l Log) DDL() string {
	return fmt.Sprintf(`CREATE TABLE IF NOT EXISTS %s (
	id   bigint PRIMARY KEY,
	at   timestamptz NOT NULL DEFAULT clock_timestamp(),
	node uuid NOT NULL,
	kind text NOT NULL,
	run  bigint NOT NULL,
	data jsonb NOT NULL DEFAULT '{}'
)`, l.Table)
}

// ErrRefused wraps the error of an append's check.
var ErrRefused = errors.New("refused")

// Append adds a message in its own transaction. check, if not nil, sees the
// last message (nil if the log is empty) under the append lock and may refuse
// the append, which makes "append only if the state is still X" atomic. run
// 0 means the run of the last message; a reset starts a new run.
func (l Log) Append(ctx context.Context, conn *pgx.Conn, node uuid.UUID, kind string, run int64, data any, check func(last *Message) error) (Message, error) {
	var m Message
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		var err error
		m, err = l.AppendTx(ctx, tx, node, kind, run, data, check)
		return err
	})
	return m, err
}

// AppendTx adds a message inside the caller's transaction: it becomes
// visible, and is notified, when that transaction commits.
func (l Log) AppendTx(ctx context.Context, tx pgx.Tx, node uuid.UUID, kind string, run int64, data any, check func(last *Message) error) (Message, error) {
	if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1, $2)", l.Lock[0], l.Lock[1]); err != nil {
		return Message{}, fmt.Errorf("append %s: %w", kind, err)
	}
	last, err := l.last(ctx, tx)
	if err != nil {
		return Message{}, fmt.Errorf("append %s: %w", kind, err)
	}
	if check != nil {
		if err := check(last); err != nil {
			return Message{}, fmt.Errorf("%w: %w", ErrRefused, err)
		}
	}
	raw, err := json.Marshal(data)
	if err != nil {
		return Message{}, err
	}
	if data == nil {
		raw = []byte("{}")
	}
	id := int64(1)
	if last != nil {
		id = last.ID + 1
		if run == 0 {
			run = last.Run // 0: the current run
		}
	}
	if kind == KindReset {
		run = id
	}
	m := Message{ID: id, Node: node, Kind: kind, Run: run, Data: raw}
	err = tx.QueryRow(ctx, "INSERT INTO "+l.Table+" (id, node, kind, run, data) VALUES ($1, $2, $3, $4, $5) RETURNING at",
		id, node, kind, run, raw).Scan(&m.At)
	if err != nil {
		return Message{}, fmt.Errorf("append %s: %w", kind, err)
	}
	if kind == KindReset {
		if _, err := tx.Exec(ctx, "DELETE FROM "+l.Table+" WHERE id < $1", id); err != nil {
			return Message{}, err
		}
	}
	if _, err := tx.Exec(ctx, "SELECT pg_notify($1, $2)", l.Channel, fmt.Sprint(id)); err != nil {
		return Message{}, err
	}
	return m, nil
}

func (l Log) last(ctx context.Context, tx pgx.Tx) (*Message, error) {
	var m Message
	err := tx.QueryRow(ctx, "SELECT id, at, node, kind, run, data FROM "+l.Table+" ORDER BY id DESC LIMIT 1").
		Scan(&m.ID, &m.At, &m.Node, &m.Kind, &m.Run, &m.Data)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return &m, nil
}

// Read returns the messages with id > after, in order.
func (l Log) Read(ctx context.Context, conn *pgx.Conn, after int64) ([]Message, error) {
	rows, err := conn.Query(ctx, "SELECT id, at, node, kind, run, data FROM "+l.Table+" WHERE id > $1 ORDER BY id", after)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Message, error) {
		var m Message
		return m, r.Scan(&m.ID, &m.At, &m.Node, &m.Kind, &m.Run, &m.Data)
	})
}
