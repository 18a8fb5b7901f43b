{{/* Names and labels. */}}
{{- define "lessserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Kept short: KubeRay appends suffixes (-raycluster-xxxxx, -serve-svc, -head-svc) to the RayService name. */}}
{{- define "lessserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "lessserve.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "lessserve.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lessserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lessserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lessserve.labels" -}}
{{ include "lessserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "lessserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Redis: the URL the workers use (in-chart StatefulSet or external). */}}
{{- define "lessserve.redisURL" -}}
{{- if .Values.redis.external.url -}}
{{- .Values.redis.external.url -}}
{{- else if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:%d/0" (include "lessserve.fullname" .) (int .Values.redis.port) -}}
{{- end -}}
{{- end -}}

{{/* Redis AUTH: the app reads a password when the in-chart Redis has auth on, or an external Redis
has an existing Secret (the Python twin: lessserve.deploy.render.redis_auth). */}}
{{- define "lessserve.redisAuth" -}}
{{- if .Values.redis.external.url -}}
{{- if .Values.redis.auth.existingSecret -}}true{{- end -}}
{{- else if and .Values.redis.enabled .Values.redis.auth.enabled -}}true{{- end -}}
{{- end -}}

{{- define "lessserve.redisSecret" -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis-auth" (include "lessserve.fullname" .)) -}}
{{- end -}}

{{/* A model volume (a PVC or a hostPath) is mounted on the Ray pods. */}}
{{- define "lessserve.modelVolume" -}}
{{- if or .Values.model.existingClaim .Values.model.hostPath -}}true{{- end -}}
{{- end -}}

{{- define "lessserve.apiKeysSecret" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "lessserve.fullname" .)) -}}
{{- end -}}

{{- define "lessserve.apiKeysEnabled" -}}
{{- if or .Values.apiKeys.existingSecret .Values.apiKeys.keys -}}true{{- end -}}
{{- end -}}

{{/*
The application's arguments: `.Values.serve` (field names identical to
lessserve.cluster.config.ServeConfig) with what the chart owns filled in: bind address and port
(KubeRay's serve service targets 8000), the Redis URL and password file, and the mounted API-key file.
*/}}
{{- define "lessserve.serveArgs" -}}
{{- $args := deepCopy .Values.serve -}}
{{- if and (include "lessserve.modelVolume" .) .Values.model.path -}}
{{- $engine := $args.engine | default dict -}}
{{- $_ := set $engine "model" (printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) (trimPrefix "/" .Values.model.path)) -}}
{{- $_ := set $args "engine" $engine -}}
{{- end -}}
{{- $_ := set $args "host" "0.0.0.0" -}}
{{- $_ := set $args "port" 8000 -}}
{{- $store := $args.store | default dict -}}
{{- $redis := include "lessserve.redisURL" . -}}
{{- if $redis -}}
{{- $_ := set $store "redis_url" $redis -}}
{{- end -}}
{{- if include "lessserve.redisAuth" . -}}
{{- $_ := set $store "redis_password_file" (printf "%s/%s" .Values.redis.auth.mountPath .Values.redis.auth.secretKey) -}}
{{- end -}}
{{- if $store -}}
{{- $_ := set $args "store" $store -}}
{{- end -}}
{{- if include "lessserve.apiKeysEnabled" . -}}
{{- $_ := set $args "api_keys_file" (printf "%s/%s" .Values.apiKeys.mountPath .Values.apiKeys.secretKey) -}}
{{- end -}}
{{- toYaml $args -}}
{{- end -}}

{{/* The Serve config, shaped like lessserve.cluster.config.serve_config_document. */}}
{{- define "lessserve.serveConfig" -}}
{{- $args := include "lessserve.serveArgs" . | fromYaml -}}
{{- $app := dict "name" .Values.applicationName "route_prefix" "/" "import_path" "lessserve.cluster.app:build_app" "args" $args -}}
{{- $doc := dict "http_options" (dict "host" "0.0.0.0" "port" 8000) "applications" (list $app) -}}
{{- toYaml $doc -}}
{{- end -}}

{{/* Drain budget: Serve's graceful_shutdown_timeout_s for a worker replica is drain_timeout_s + 10. */}}
{{- define "lessserve.drainTimeout" -}}
{{- $d := 60.0 -}}
{{- if hasKey .Values.serve "drain_timeout_s" -}}{{- $d = .Values.serve.drain_timeout_s -}}{{- end -}}
{{- $d | float64 | ceil | int -}}
{{- end -}}

{{- define "lessserve.replicaShutdown" -}}
{{- add (include "lessserve.drainTimeout" . | int) 10 -}}
{{- end -}}

{{/* Worker pods: grace = preStop budget (replica shutdown + margin) unless set higher by hand. */}}
{{- define "lessserve.workerGrace" -}}
{{- $min := add (include "lessserve.replicaShutdown" . | int) (int .Values.workers.preStopMarginSeconds) -}}
{{- $set := .Values.workers.terminationGracePeriodSeconds -}}
{{- if $set -}}
{{- if lt (int $set) (int $min) -}}
{{- fail (printf "workers.terminationGracePeriodSeconds=%v is shorter than the drain budget %d s (serve.drain_timeout_s + 10 + workers.preStopMarginSeconds)" $set $min) -}}
{{- end -}}
{{- int $set -}}
{{- else -}}
{{- $min -}}
{{- end -}}
{{- end -}}
