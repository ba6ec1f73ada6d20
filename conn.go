package swo

import (
	"context"
	"database/sql/driver"
	"sync"
	"sync/atomic"

	"github.com/jackc/pgx/v5/stdlib"
)

// conn wraps an application connection to the old database in switchover
// mode. It embeds the pgx stdlib connection, so every query path is pgx's own
// with no added work; it only adds what the connector needs to drain the old
// database without failing a query:
//
// database/sql calls IsValid when a connection comes back to its pool and
// ResetSession when it takes a used one out again. The wrapper follows those
// two calls to know whether database/sql holds the connection idle in its
// pool (pooled) or has handed it to the application (busy). To drain, the
// connector retires every connection: a pooled one is closed at once, which
// releases its connection lock, and the ResetSession that would hand it out
// again reports driver.ErrBadConn, so database/sql discards it and opens
// another (which waits for the switch) before any work was done on it; a busy
// one finishes what the application is doing (a query, a transaction, a
// *sql.Conn) and is closed when IsValid sees it come back.
type conn struct {
	*stdlib.Conn
	c *Connector

	state     atomic.Int32
	closeOnce sync.Once
	closeErr  error
}

// Connection states. Fresh connections are busy: database/sql hands them
// straight to a caller.
const (
	connBusy       int32 = iota // held by the application
	connPooled                  // idle in database/sql's pool
	connBusyRetire              // held by the application; close when returned
	connRetired                 // closed by the drain while pooled
)

// retire closes the connection if it is pooled, or marks it to be closed when
// it comes back. Safe to call concurrently with database/sql's calls.
func (cn *conn) retire() {
	for {
		switch s := cn.state.Load(); s {
		case connPooled:
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
	return cn.state.CompareAndSwap(connBusy, connPooled)
}

// ResetSession implements driver.SessionResetter: database/sql calls it before
// reusing a pooled connection. A retired connection reports ErrBadConn, so
// database/sql discards it before doing any work on it.
func (cn *conn) ResetSession(ctx context.Context) error {
	if !cn.state.CompareAndSwap(connPooled, connBusy) && cn.state.Load() != connBusy {
		return driver.ErrBadConn
	}
	return cn.Conn.ResetSession(ctx)
}

// Close implements driver.Conn.
func (cn *conn) Close() error {
	err := cn.closePhysical()
	cn.c.forget(cn)
	return err
}

func (cn *conn) closePhysical() error {
	cn.closeOnce.Do(func() { cn.closeErr = cn.Conn.Close() })
	return cn.closeErr
}
