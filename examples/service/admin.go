package main

// The switchover admin surface: one file and one page (admin.html), meant
// to be copied into a host service as they are. They use nothing but the
// public API of github.com/pgswo/swo and the standard library.
//
// Mount it under a path that ends in "/", behind the host's own
// authentication (the handler authenticates no one: whoever reaches it can
// switch the service's database):
//
//	mux.Handle("/admin/switchover/", requireAdmin(
//		http.StripPrefix("/admin/switchover", AdminHandler(connector))))
//
// Routes, relative to the mount point:
//
//	GET  /         the page (it polls status every second)
//	GET  /status   swo.Status as JSON (with last_error_hint)
//	POST /reset    RESET; answers AdminResult as JSON
//	POST /execute  EXECUTE; answers AdminResult when the run ends
//
// The POST routes refuse cross-site requests (http.CrossOriginProtection):
// a page on another site cannot make an operator's browser press a button.
// Requests without browser headers (curl, scripts) pass.

import (
	"context"
	_ "embed" // the page
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/pgswo/swo"
)

//go:embed admin.html
var adminPage []byte

// AdminResult is the answer of POST /reset and POST /execute.
type AdminResult struct {
	// OK is true when the command succeeded: RESET left the cluster idle,
	// EXECUTE switched every node to the new database.
	OK bool `json:"ok"`
	// Error is the library's error, as it gave it (never a password).
	Error string `json:"error,omitempty"`
	// Hint says what the operator can do about Error.
	Hint string `json:"hint,omitempty"`
	// Problems lists every precondition that failed, one object each.
	Problems []swo.Problem `json:"problems,omitempty"`
	// ElapsedMS is how long the command took.
	ElapsedMS int64 `json:"elapsed_ms"`
}

// resetTimeout bounds a RESET. It does not depend on the request: an
// operator who closes the page must not leave a RESET half done.
const resetTimeout = 5 * time.Minute

// AdminHandler returns the switchover page and its endpoints for c. See
// the comment at the top of admin.go for the routes and how to mount it.
func AdminHandler(c *swo.Connector) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		w.Header().Set("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:")
		w.Header().Set("X-Frame-Options", "DENY")
		_, _ = w.Write(adminPage)
	})
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		s := c.Status()
		adminJSON(w, http.StatusOK, AdminStatus{Status: s, LastErrorHint: lastErrorHint(s.LastError)})
	})
	mux.HandleFunc("POST /reset", func(w http.ResponseWriter, r *http.Request) {
		slog.Info("switchover: RESET requested", "from", r.RemoteAddr)
		ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), resetTimeout)
		defer cancel()
		start := time.Now()
		err := c.Reset(ctx)
		adminAnswer(w, "RESET", err, time.Since(start))
	})
	mux.HandleFunc("POST /execute", func(w http.ResponseWriter, r *http.Request) {
		slog.Info("switchover: EXECUTE requested", "from", r.RemoteAddr)
		start := time.Now()
		// Cancelling the request (the operator closes the page) stops the
		// waiting, not the run: the page shows how it ends.
		err := c.Execute(r.Context())
		adminAnswer(w, "EXECUTE", err, time.Since(start))
	})

	protect := http.NewCrossOriginProtection()
	protect.SetDenyHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		adminJSON(w, http.StatusForbidden, AdminResult{Error: "cross-origin request refused",
			Hint: "press the buttons on the switchover page itself, or send the request without browser headers (curl)"})
	}))
	return protect.Handler(mux)
}

func adminAnswer(w http.ResponseWriter, command string, err error, took time.Duration) {
	res := AdminResult{OK: err == nil, ElapsedMS: took.Milliseconds()}
	code := http.StatusOK
	if err != nil {
		slog.Warn("switchover: "+command+" failed", "err", err)
		res.Error = err.Error()
		res.Hint = AdminHint(err)
		var pe *swo.PreconditionError
		if errors.As(err, &pe) {
			res.Problems = pe.Problems
		}
		code = http.StatusConflict
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			code = http.StatusGatewayTimeout
		}
	}
	adminJSON(w, code, res)
}

// hints say what an operator can do about each of the library's errors,
// the most specific first: a failed run wraps ErrRunFailed and its cause.
var hints = []struct {
	err  error
	hint string
}{
	{swo.ErrPreconditions, "Fix every problem listed (in the old or the new database; a table missing or different in the new " +
		"database usually means its migrations were not run there), then press RESET again."},
	{swo.ErrTargetNotEmpty, "The new database holds rows that a switchover would delete. Point --db-url-next at the right, " +
		"empty (migrated) database, or empty the tables named, then press RESET again."},
	{swo.ErrPauseBudget, "The service's transactions on the old database did not finish within the pause budget, so the switch " +
		"was called off and the service stayed on the old database. Look for long transactions or connections held open " +
		"(the error names them), then press RESET and EXECUTE again."},
	{swo.ErrUnconfirmed, "The switch is done: the new database is live. Check the nodes the error names (their routing on this " +
		"page), then restart every instance with --db-url=<the new database> only, as planned."},
	{swo.ErrDone, "The switch is complete. Restart every instance with --db-url=<the new database> only, without --db-url-next."},
	{swo.ErrObsolete, "A configured database was switched away from. Restart the instances with --db-url=<the database now live>."},
	{swo.ErrNotReady, "Nothing was changed. Press RESET first and wait for the state \"idle\"; every node must show a valid configuration."},
	{swo.ErrConfig, "An instance's configuration is not usable: fix the setting the error names and restart that instance."},
	{swo.ErrClosed, "This instance is shutting down: use the page of another instance."},
	{context.Canceled, "This page stopped waiting; the command may still be running. Watch the state."},
	{context.DeadlineExceeded, "This page stopped waiting; the command may still be running. Watch the state."},
	{swo.ErrRunFailed, "The run failed safely: the service still uses the old database. Fix the cause in the error, then press " +
		"RESET and EXECUTE again."},
	{swo.ErrResetFailed, "RESET ran but a check failed: fix what the error says, then press RESET again."},
}

// AdminHint turns an error of Reset or Execute into what the operator can
// do about it.
func AdminHint(err error) string {
	if err == nil {
		return ""
	}
	for _, h := range hints {
		if errors.Is(err, h.err) {
			return h.hint
		}
	}
	return "Fix what the error says, then press RESET (and EXECUTE) again."
}

// lastErrorHint is AdminHint for Status.LastError, which is text only: it
// looks for the library's error texts in it.
func lastErrorHint(text string) string {
	if text == "" {
		return ""
	}
	for _, h := range hints {
		if strings.Contains(text, h.err.Error()) {
			return h.hint
		}
	}
	return ""
}

// AdminStatus is the answer of GET /status: swo.Status (its fields, at the
// top level) and what to do about its last error.
type AdminStatus struct {
	swo.Status
	// LastErrorHint says what the operator can do about LastError.
	LastErrorHint string `json:"last_error_hint,omitempty"`
}

func adminJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}
