package swo

import (
	"context"
	"database/sql/driver"
	"sync"
	"sync/atomic"

	"github.com/jackc/pgx/v5/stdlib"
)

// conn wraps an application connection to the old database in switchover
// mode. It embeds the pgx stdlib connection, so every query path is pgx's
// own; it adds one atomic check per call so that the connector can drain the
// old database without failing a query:
//
// A connection is idle (in database/sql's pool, or just opened) or busy (in
// the application's hands). Every entry point (ResetSession, and each call
// that does work) marks it busy; IsValid, which database/sql calls when the
// connection comes back to its pool, marks it idle. The states do not rely
// on database/sql calling ResetSession before each hand-out (it does not for
// fresh connections) nor IsValid before each pooling (it does not for
// connections its opener parks): a call on a connection is what proves it
// busy. To drain, the connector retires every connection: an idle one is
// closed at once, which releases its connection lock, and its next call (if
// database/sql hands it out) reports driver.ErrBadConn before doing any
// work, so database/sql discards it and opens another, which waits for the
// switch; a busy one finishes what the application is doing (a query, a
// transaction, a *sql.Conn) and is closed when it comes back.
//
// Raw access (sql.Conn.Raw) bypasses these calls: do not hold a raw pgx
// connection from the connector across a switchover. One narrow window
// remains: a *sql.Conn taken on a freshly opened connection at the instant
// the drain starts, before its first call, gets driver.ErrBadConn on that
// call (database/sql retries it for DB-level calls, not for a *sql.Conn).
type conn struct {
	*stdlib.Conn
	r *router

	state     atomic.Int32
	closeOnce sync.Once
	closeErr  error
}

// Connection states.
const (
	connIdle       int32 = iota // in the pool, or not yet used
	connBusy                    // in the application's hands
	connBusyRetire              // in the application's hands; close when returned
	connRetired                 // closed by the drain while idle
)

// enter marks the connection busy; false if it was retired.
func (cn *conn) enter() bool {
	for {
		switch s := cn.state.Load(); s {
		case connBusy, connBusyRetire:
			return true
		case connIdle:
			if cn.state.CompareAndSwap(s, connBusy) {
				return true
			}
		default:
			return false
		}
	}
}

// retire closes the connection if it is idle, or marks it to be closed when
// it comes back. Safe to call concurrently with database/sql's calls.
func (cn *conn) retire() {
	for {
		switch s := cn.state.Load(); s {
		case connIdle:
			if cn.state.CompareAndSwap(s, connRetired) {
				_ = cn.closePhysical()
				return
			}
		case connBusy:
			if cn.state.CompareAndSwap(s, connBusyRetire) {
				return
			}
		default:
			return
		}
	}
}

// IsValid implements driver.Validator: database/sql calls it when the
// connection is returned to the pool.
func (cn *conn) IsValid() bool {
	if cn.Conn.Conn().IsClosed() {
		return false
	}
	for {
		switch s := cn.state.Load(); s {
		case connIdle:
			return true
		case connBusy:
			if cn.state.CompareAndSwap(s, connIdle) {
				return true
			}
		default:
			return false
		}
	}
}

// ResetSession implements driver.SessionResetter: database/sql calls it
// before reusing a pooled connection.
func (cn *conn) ResetSession(ctx context.Context) error {
	if !cn.enter() {
		return driver.ErrBadConn
	}
	return cn.Conn.ResetSession(ctx)
}

// The calls that do work. Each is pgx's, behind enter.

// PrepareContext implements driver.ConnPrepareContext.
func (cn *conn) PrepareContext(ctx context.Context, query string) (driver.Stmt, error) {
	if !cn.enter() {
		return nil, driver.ErrBadConn
	}
	return cn.Conn.PrepareContext(ctx, query)
}

// Prepare implements driver.Conn.
func (cn *conn) Prepare(query string) (driver.Stmt, error) {
	return cn.PrepareContext(context.Background(), query)
}

// BeginTx implements driver.ConnBeginTx.
func (cn *conn) BeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	if !cn.enter() {
		return nil, driver.ErrBadConn
	}
	return cn.Conn.BeginTx(ctx, opts)
}

// Begin implements driver.Conn.
func (cn *conn) Begin() (driver.Tx, error) {
	return cn.BeginTx(context.Background(), driver.TxOptions{})
}

// ExecContext implements driver.ExecerContext.
func (cn *conn) ExecContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Result, error) {
	if !cn.enter() {
		return nil, driver.ErrBadConn
	}
	return cn.Conn.ExecContext(ctx, query, args)
}

// QueryContext implements driver.QueryerContext.
func (cn *conn) QueryContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Rows, error) {
	if !cn.enter() {
		return nil, driver.ErrBadConn
	}
	return cn.Conn.QueryContext(ctx, query, args)
}

// Ping implements driver.Pinger.
func (cn *conn) Ping(ctx context.Context) error {
	if !cn.enter() {
		return driver.ErrBadConn
	}
	return cn.Conn.Ping(ctx)
}

// Close implements driver.Conn.
func (cn *conn) Close() error {
	err := cn.closePhysical()
	cn.r.forget(cn)
	return err
}

func (cn *conn) closePhysical() error {
	cn.closeOnce.Do(func() { cn.closeErr = cn.Conn.Close() })
	return cn.closeErr
}
