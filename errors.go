package swo

import (
	"errors"
	"fmt"
	"strings"

	"github.com/pgswo/swo/internal/dsn"
)

// The errors callers branch on. Test them with errors.Is: the connector
// wraps them with the details (the object, the node, the phase). An error
// that a leading node met reaches Execute on every node with its identity:
// errors.Is(err, ErrPauseBudget) holds on the node that pressed EXECUTE even
// when another node led the run, and errors.As finds a *PreconditionError.
var (
	// ErrObsolete: the database was switched away from; it must no longer
	// be used. NewConnector, Connect and OpenPool's connections return it.
	ErrObsolete = errors.New("database is obsolete")
	// ErrConfig: the configuration is not valid; the message names the
	// Config field (and its flag) at fault.
	ErrConfig = errors.New("invalid configuration")
	// ErrClosed: the connector was closed.
	ErrClosed = errors.New("connector closed")
	// ErrNotReady: EXECUTE was refused (no successful RESET before it, or a
	// node's configuration is not valid); nothing was changed.
	ErrNotReady = errors.New("not ready to execute")
	// ErrRunFailed: the run failed; the service runs on the old database.
	// RESET, fix the cause, and EXECUTE again.
	ErrRunFailed = errors.New("execution failed")
	// ErrResetFailed: RESET ran but a check failed; its text says what.
	ErrResetFailed = errors.New("reset failed")
	// ErrDone: the switch is complete; there is nothing to reset.
	ErrDone = errors.New("the switch is done")
	// ErrPreconditions: the databases do not meet the preconditions of a
	// switchover. The error is a *PreconditionError listing every problem.
	ErrPreconditions = errors.New("preconditions not met")
	// ErrTargetNotEmpty: the new database holds rows that differ from the
	// old database's, and Config.AllowClearTarget is not set.
	ErrTargetNotEmpty = errors.New("the new database holds data that would be lost")
	// ErrPauseBudget: the application's transactions on the old database did
	// not finish within Config.PauseBudget; the run aborted and the service
	// carries on with the old database.
	ErrPauseBudget = errors.New("pause budget exceeded")
	// ErrUnconfirmed: the switch committed (the new database is live), but
	// Execute could not see every alive node confirm that it routes there.
	// Nothing is to be undone: check the nodes it names (Status shows each
	// node's routing), and restart them on the new URL as planned.
	ErrUnconfirmed = errors.New("switched, but not confirmed by every node")
)

// codes name the sentinels in the message log, so that a failure keeps its
// identity on the nodes that read it. Codes are stable: they are stored.
var codes = []struct {
	code string
	err  error
}{
	// Most specific first: a failure wraps ErrRunFailed and its cause.
	{"preconditions", ErrPreconditions},
	{"target_not_empty", ErrTargetNotEmpty},
	{"pause_budget", ErrPauseBudget},
	{"obsolete", ErrObsolete},
	{"config", ErrConfig},
	{"not_ready", ErrNotReady},
	{"done", ErrDone},
	{"closed", ErrClosed},
}

// Problem is one reason why the databases cannot be switched over.
type Problem struct {
	// Object names the object at fault: "public.orders",
	// "public.orders.total", "node web-2", "database", …
	Object string `json:"object"`
	// Issue says what is wrong and, where it can, what to do.
	Issue string `json:"issue"`
}

func (p Problem) String() string { return p.Object + ": " + p.Issue }

// PreconditionError lists every problem the preconditions found. It
// matches ErrPreconditions with errors.Is; get the list with errors.As.
type PreconditionError struct {
	Problems []Problem
}

func (e *PreconditionError) Error() string {
	lines := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		lines[i] = "  - " + p.String()
	}
	return fmt.Sprintf("%s: %d problem(s):\n%s", ErrPreconditions, len(e.Problems), strings.Join(lines, "\n"))
}

// Is makes errors.Is(err, ErrPreconditions) hold.
func (e *PreconditionError) Is(target error) bool { return target == ErrPreconditions }

// failure is an error as the message log carries it between nodes.
type failure struct {
	Error    string    `json:"error"`
	Code     string    `json:"code,omitempty"`
	Problems []Problem `json:"problems,omitempty"`
}

// encodeFailure records err for the log: its text, the code of the most
// specific sentinel it wraps, and its problems if it lists any.
func encodeFailure(err error) failure {
	f := failure{Error: err.Error()}
	for _, c := range codes {
		if errors.Is(err, c.err) {
			f.Code = c.code
			break
		}
	}
	var pe *PreconditionError
	if errors.As(err, &pe) {
		f.Problems = pe.Problems
	}
	return f
}

// err rebuilds the failure on the receiving node: the same text, matching
// the same sentinel, and a *PreconditionError when it listed problems.
func (f failure) err() error {
	if f.Error == "" && f.Code == "" {
		return nil
	}
	re := &remoteError{msg: f.Error}
	for _, c := range codes {
		if c.code == f.Code {
			re.kind = c.err
		}
	}
	if len(f.Problems) > 0 {
		re.kind = &PreconditionError{Problems: f.Problems}
	}
	return re
}

// remoteError is an error another node met, rebuilt from the log.
type remoteError struct {
	msg  string
	kind error // the sentinel (or *PreconditionError) it matched there
}

func (e *remoteError) Error() string { return e.msg }
func (e *remoteError) Unwrap() error { return e.kind }

// publicError is how every error leaves the package: prefixed "swo: " once
// (however deep the chain), and with the configured passwords taken out of
// its text. The chain stays intact for errors.Is and errors.As.
type publicError struct {
	msg string
	err error
}

func (e *publicError) Error() string { return e.msg }
func (e *publicError) Unwrap() error { return e.err }

// redactor takes the configured passwords out of errors at the package's
// boundary.
type redactor struct{ passwords []string }

// public returns err as the package's callers see it.
func (r redactor) public(err error) error {
	if err == nil {
		return nil
	}
	var pe *publicError
	if errors.As(err, &pe) && pe == err {
		return err
	}
	msg := dsn.Scrub(err.Error(), r.passwords...)
	if !strings.HasPrefix(msg, "swo: ") {
		msg = "swo: " + msg
	}
	return &publicError{msg: msg, err: err}
}

// scrub takes the passwords out of err's text without the prefix (for logs
// and the texts stored in the databases).
func (r redactor) scrub(err error) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	clean := dsn.Scrub(msg, r.passwords...)
	if clean == msg {
		return err
	}
	return &scrubbedError{msg: clean, err: err}
}

type scrubbedError struct {
	msg string
	err error
}

func (e *scrubbedError) Error() string { return e.msg }
func (e *scrubbedError) Unwrap() error { return e.err }

// preconditions converts the schema package's problems to the public error.
func preconditions(probs []Problem) error {
	return &PreconditionError{Problems: probs}
}
