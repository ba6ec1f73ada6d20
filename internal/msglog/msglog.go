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
	KindPrepare   = "prepare"   // the pause is near: nodes open connections to the new database
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
// 0 means the run of the last message; a reset starts a new run. It costs two
// round trips.
func (l Log) Append(ctx context.Context, conn *pgx.Conn, node uuid.UUID, kind string, run int64, data any, check func(last *Message) error) (Message, error) {
	m, err := l.append(ctx, conn, true, node, kind, run, data, check)
	if err != nil && conn.PgConn().TxStatus() != 'I' {
		_, _ = conn.Exec(context.Background(), "ROLLBACK")
	}
	return m, err
}

// AppendTx adds a message inside the caller's transaction: it becomes
// visible, and is notified, when that transaction commits. before are
// statements (without parameters) to run first, in the same round trip.
func (l Log) AppendTx(ctx context.Context, tx pgx.Tx, node uuid.UUID, kind string, run int64, data any, check func(last *Message) error, before ...string) (Message, error) {
	return l.append(ctx, tx.Conn(), false, node, kind, run, data, check, before...)
}

// append runs the append in two round trips: [begin, before…, lock, last],
// then, if check agrees, [insert, (prune), notify, (commit)].
func (l Log) append(ctx context.Context, conn *pgx.Conn, ownTx bool, node uuid.UUID, kind string, run int64, data any, check func(last *Message) error, before ...string) (Message, error) {
	raw, err := json.Marshal(data)
	if err != nil {
		return Message{}, err
	}
	if data == nil {
		raw = []byte("{}")
	}
	b := &pgx.Batch{}
	if ownTx {
		b.Queue("BEGIN")
	}
	for _, sql := range before {
		b.Queue(sql)
	}
	b.Queue("SELECT pg_advisory_xact_lock($1, $2)", l.Lock[0], l.Lock[1])
	var last *Message
	b.Queue("SELECT id, at, node, kind, run, data FROM " + l.Table + " ORDER BY id DESC LIMIT 1").QueryRow(func(row pgx.Row) error {
		var m Message
		err := row.Scan(&m.ID, &m.At, &m.Node, &m.Kind, &m.Run, &m.Data)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil
		}
		last = &m
		return err
	})
	if err := conn.SendBatch(ctx, b).Close(); err != nil {
		return Message{}, fmt.Errorf("append %s: %w", kind, err)
	}
	if check != nil {
		if err := check(last); err != nil {
			return Message{}, fmt.Errorf("%w: %w", ErrRefused, err)
		}
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
	b = &pgx.Batch{}
	b.Queue("INSERT INTO "+l.Table+" (id, node, kind, run, data) VALUES ($1, $2, $3, $4, $5) RETURNING at",
		id, node, kind, run, raw).QueryRow(func(row pgx.Row) error { return row.Scan(&m.At) })
	if kind == KindReset {
		b.Queue("DELETE FROM "+l.Table+" WHERE id < $1", id)
	}
	b.Queue("SELECT pg_notify($1, $2)", l.Channel, fmt.Sprint(id))
	if ownTx {
		b.Queue("COMMIT")
	}
	if err := conn.SendBatch(ctx, b).Close(); err != nil {
		return Message{}, fmt.Errorf("append %s: %w", kind, err)
	}
	return m, nil
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
