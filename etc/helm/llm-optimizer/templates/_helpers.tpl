{{/* Names and labels. */}}
{{- define "llm-optimizer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "llm-optimizer.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "llm-optimizer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-optimizer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "llm-optimizer.labels" -}}
{{ include "llm-optimizer.selectorLabels" . }}
app.kubernetes.io/part-of: llm-optimizer
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "llm-optimizer.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Refusals of values that cannot work, each with its reason. */}}
{{- define "llm-optimizer.validate" -}}
{{- $v := .Values -}}
{{- if not (has $v.storage.backend (list "leveldb" "postgres")) -}}
{{- fail (printf "storage.backend must be leveldb or postgres, not %v" $v.storage.backend) -}}
{{- end -}}
{{- if and (gt (int $v.replicaCount) 1) (eq $v.storage.backend "leveldb") -}}
{{- fail (printf "replicaCount=%v with the embedded store: storage.backend=leveldb keeps its data on a ReadWriteOnce volume with a single LevelDB writer, so exactly one replica can run. Set replicaCount=1, or use external storage (storage.backend=postgres) and scale ingest with ingest.enabled/ingest.replicas." (toString $v.replicaCount)) -}}
{{- end -}}
{{- if gt (int $v.replicaCount) 1 -}}
{{- fail (printf "replicaCount=%v: the primary pod runs the processor, which keeps one checkpoint (windows, proposals, rollouts) that a second processor would overwrite. Keep replicaCount=1 and scale ingest with ingest.enabled/ingest.replicas (or autoscaling)." (toString $v.replicaCount)) -}}
{{- end -}}
{{- if lt (int $v.replicaCount) 1 -}}
{{- fail "replicaCount must be 1" -}}
{{- end -}}
{{- if and $v.ingest.enabled (eq $v.storage.backend "leveldb") -}}
{{- fail "ingest.enabled needs external storage (storage.backend=postgres): collector-only pods cannot share the primary's embedded LevelDB store." -}}
{{- end -}}
{{- if and $v.autoscaling.enabled (not $v.ingest.enabled) -}}
{{- fail "autoscaling scales the ingest Deployment: set ingest.enabled=true (with storage.backend=postgres)." -}}
{{- end -}}
{{- if and (eq $v.storage.backend "postgres") (not $v.storage.postgres.existingSecret) -}}
{{- fail "storage.backend=postgres needs storage.postgres.existingSecret: a Secret holding the DSN under storage.postgres.dsnKey." -}}
{{- end -}}
{{- if and $v.redis.enabled (not $v.redis.existingSecret) -}}
{{- fail "redis.enabled needs redis.existingSecret: a Secret holding the URL under redis.urlKey." -}}
{{- end -}}
{{- if and (or $v.kafka.eventLog.enabled $v.kafka.collector.enabled) (not $v.kafka.bootstrapServers) -}}
{{- fail "kafka.eventLog.enabled or kafka.collector.enabled needs kafka.bootstrapServers." -}}
{{- end -}}
{{- range $key, $_ := $v.envSecret.values -}}
{{- if not (hasPrefix "LLM_OPTIMIZER__" $key) -}}
{{- fail (printf "envSecret.values: %s is not an LLM_OPTIMIZER__SECTION__KEY variable" $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The optimizer's config as a dict: what the chart sets, with .Values.config deep-merged over it.
Argument: (dict "root" $ "ingest" bool).
*/}}
{{- define "llm-optimizer.config" -}}
{{- $v := .root.Values -}}
{{- $p := $v.service.ports -}}
{{- $cfg := dict
  "supervisor" (dict "runtime_dir" "/run/llm-optimizer/rt" "data_dir" "/var/lib/llm-optimizer/data")
  "observability" (dict "json_logs" true)
  "admin" (dict "listen" (printf "0.0.0.0:%v" $p.metrics))
  "storage" (dict "backend" $v.storage.backend)
  "collector" (dict "listen" (printf "0.0.0.0:%v" $p.otlpHttp) "otlp_grpc_listen" (printf "0.0.0.0:%v" $p.otlpGrpc))
  "rest_api" (dict "listen" (printf "0.0.0.0:%v" $p.http))
  "grpc_api" (dict "listen" (printf "0.0.0.0:%v" $p.grpc))
-}}
{{- if eq $v.storage.backend "postgres" -}}
{{- $_ := set $cfg.storage "postgres_pool_size" (int $v.storage.postgres.poolSize) -}}
{{- end -}}
{{- if $v.kafka.eventLog.enabled -}}
{{- $_ := set $cfg "event_log" (dict "backend" "kafka" "log" $v.kafka.eventLog.topic "kafka_bootstrap" $v.kafka.bootstrapServers "kafka_client_options" $v.kafka.clientOptions) -}}
{{- end -}}
{{- if $v.kafka.collector.enabled -}}
{{- $k := $v.kafka.collector -}}
{{- $_ := set $cfg.collector "kafka" (dict "enabled" true "bootstrap_servers" $v.kafka.bootstrapServers "topic" $k.topic "group_id" $k.groupId "dead_letter_topic" $k.deadLetterTopic "value_format" $k.valueFormat "client_options" $v.kafka.clientOptions) -}}
{{- end -}}
{{- $cfg = mustMergeOverwrite $cfg (deepCopy $v.config) -}}
{{- if .ingest -}}
{{- range $service := list "processor" "rest_api" "grpc_api" "integrations" -}}
{{- $_ := set $cfg $service (mustMergeOverwrite (default (dict) (get $cfg $service)) (dict "enabled" false)) -}}
{{- end -}}
{{- end -}}
{{- toJson $cfg -}}
{{- end -}}

{{/* TOML from a dict: a table per top-level key, dotted keys below it, JSON scalars and arrays
(valid TOML). Integral numbers are written as integers, which float keys accept too. */}}
{{- define "llm-optimizer.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{- define "llm-optimizer.tomlKeys" -}}
{{- $prefix := .prefix -}}
{{- range $k, $val := .table -}}
{{- $key := printf "%s%s" $prefix (include "llm-optimizer.tomlKey" $k) -}}
{{- if kindIs "invalid" $val -}}
{{- else if and (kindIs "map" $val) (gt (len $val) 0) -}}
{{- include "llm-optimizer.tomlKeys" (dict "prefix" (printf "%s." $key) "table" $val) -}}
{{- else if kindIs "map" $val }}
{{ $key }} = {}
{{- else }}
{{ $key }} = {{ toJson $val }}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "llm-optimizer.toml" -}}
{{- range $section, $table := . -}}
{{- if not (kindIs "map" $table) -}}
{{- fail (printf "config.%s must be a table (a map of keys)" $section) -}}
{{- end }}
[{{ include "llm-optimizer.tomlKey" $section }}]
{{- include "llm-optimizer.tomlKeys" (dict "prefix" "" "table" $table) -}}
{{- end -}}
{{- end -}}

{{/* The schema migrations, run by the storage backend's own open() (there is no migrate
command): the same code as etc/kubernetes/migrate-job.yaml. */}}
{{- define "llm-optimizer.migrateCommand" -}}
- python3
- -c
- |
  import asyncio, sys
  from ipc.config_loader import load_config
  from workers.storage import make_backend
  config = load_config(sys.argv[1])
  if config.storage.backend != "postgres":
      sys.exit(f"storage.backend is {config.storage.backend!r}: nothing to migrate")
  async def main():
      backend = make_backend(config.storage, "")
      await backend.open()
      print(f"PostgreSQL schema at version {backend.schema_version}", flush=True)
      await backend.close()
  asyncio.run(main())
- /etc/llm-optimizer/optimizer.toml
{{- end -}}

{{- define "llm-optimizer.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "llm-optimizer.securityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Environment of every optimizer container: secrets by reference only. */}}
{{- define "llm-optimizer.env" -}}
- name: LLM_OPTIMIZER_CONFIG
  value: /etc/llm-optimizer/optimizer.toml
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: HOME
  value: /tmp
{{- $p := .Values.service.ports }}
{{- /* The image sets these in its ENV, and the environment overrides the file: they repeat
the ConfigMap's values so that both say the same. */}}
- name: LLM_OPTIMIZER__SUPERVISOR__RUNTIME_DIR
  value: /run/llm-optimizer/rt
- name: LLM_OPTIMIZER__SUPERVISOR__DATA_DIR
  value: /var/lib/llm-optimizer/data
- name: LLM_OPTIMIZER__ADMIN__LISTEN
  value: {{ printf "0.0.0.0:%v" $p.metrics }}
- name: LLM_OPTIMIZER__REST_API__LISTEN
  value: {{ printf "0.0.0.0:%v" $p.http }}
- name: LLM_OPTIMIZER__GRPC_API__LISTEN
  value: {{ printf "0.0.0.0:%v" $p.grpc }}
- name: LLM_OPTIMIZER__COLLECTOR__LISTEN
  value: {{ printf "0.0.0.0:%v" $p.otlpHttp }}
- name: LLM_OPTIMIZER__COLLECTOR__OTLP_GRPC_LISTEN
  value: {{ printf "0.0.0.0:%v" $p.otlpGrpc }}
{{- if eq .Values.storage.backend "postgres" }}
- name: LLM_OPTIMIZER__STORAGE__POSTGRES_DSN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.storage.postgres.existingSecret }}
      key: {{ .Values.storage.postgres.dsnKey }}
{{- end }}
{{- if .Values.redis.enabled }}
- name: LLM_OPTIMIZER__STORAGE__REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.urlKey }}
{{- if .Values.redis.rateLimits }}
- name: LLM_OPTIMIZER__REST_API__RATE_LIMIT_STORAGE
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.urlKey }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "llm-optimizer.envFrom" -}}
{{- if .Values.envSecret.existingSecret }}
- secretRef:
    name: {{ .Values.envSecret.existingSecret }}
{{- end }}
{{- if .Values.envSecret.values }}
- secretRef:
    name: {{ include "llm-optimizer.fullname" . }}-env
{{- end }}
{{- end -}}

{{/* The init container applying the PostgreSQL migrations. Argument: (dict "root" $ "config" name). */}}
{{- define "llm-optimizer.migrateInit" -}}
{{- $root := .root -}}
{{- if and (eq $root.Values.storage.backend "postgres") $root.Values.storage.postgres.migrate -}}
initContainers:
  - name: migrate
    image: {{ include "llm-optimizer.image" $root }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    command:
      {{- include "llm-optimizer.migrateCommand" $root | nindent 6 }}
    env:
      {{- include "llm-optimizer.env" $root | nindent 6 }}
    {{- with include "llm-optimizer.envFrom" $root }}
    envFrom:
      {{- . | trim | nindent 6 }}
    {{- end }}
    resources:
      requests:
        cpu: 100m
        memory: 128Mi
      limits:
        cpu: "1"
        memory: 256Mi
    securityContext:
      {{- include "llm-optimizer.securityContext" $root | nindent 6 }}
    volumeMounts:
      - name: config
        mountPath: /etc/llm-optimizer
        readOnly: true
      - name: tmp
        mountPath: /tmp
{{- end }}
{{- end -}}
