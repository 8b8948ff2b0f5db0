# bash completion for gatewayctl, generated from its argument parser by
# `python -m gatewayd_dev.docgen`; do not edit.
_gatewayctl() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}
    local cmd="" action="" words="" files="" i
    case $prev in
        --socket|--config|--out|--chain|--ca-file|*-outfile|--ca-certificate|--certificate-pem|--ca-certificate-pem|--verification-certificate|--certificate-signing-request|--bundle|--reply)
            COMPREPLY=($(compgen -f -- "$cur"))
            return ;;
    esac
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in
            --socket | --config) ((i++)) ;;
            -*) ;;
            *)
                if [[ -z $cmd ]]; then cmd=${COMP_WORDS[i]}
                elif [[ -z $action ]]; then action=${COMP_WORDS[i]}; fi ;;
        esac
    done
    case "$cmd/$action" in
        "/") words="--help --version --socket --config status identity list-connections disconnect trust create-keys-and-certificate create-certificate-from-csr get-registration-code delete-registration-code register-ca-certificate update-ca-certificate describe-ca-certificate list-ca-certificates delete-ca-certificate register-certificate register-certificate-without-ca update-certificate describe-certificate list-certificates list-certificates-by-ca delete-certificate transfer-certificate accept-certificate-transfer reject-certificate-transfer cancel-certificate-transfer complete-certificate-transfer describe-endpoint" ;;
        "status/"*) words="--help" ;;
        "identity/") words="--help create-key create-csr install-certificate show renew" ;;
        "identity/create-key"*) words="--help" ;;
        "identity/create-csr"*) words="--help --out" ;;
        "identity/install-certificate"*) words="--help --chain" files=1 ;;
        "identity/show"*) words="--help" ;;
        "identity/renew"*) words="--help --now" ;;
        "list-connections/"*) words="--help" ;;
        "disconnect/"*) words="--help --client-id" ;;
        "trust/") words="--help update" ;;
        "trust/update"*) words="--help --mode --from-config --ca-file" ;;
        "create-keys-and-certificate/"*) words="--help --set-as-active --no-set-as-active --common-name --certificate-pem-outfile --public-key-outfile --private-key-outfile" ;;
        "create-certificate-from-csr/"*) words="--help --certificate-signing-request --set-as-active --no-set-as-active --certificate-pem-outfile" ;;
        "get-registration-code/"*) words="--help" ;;
        "delete-registration-code/"*) words="--help" ;;
        "register-ca-certificate/"*) words="--help --ca-certificate --verification-certificate --set-as-active --no-set-as-active --allow-auto-registration --no-allow-auto-registration" ;;
        "update-ca-certificate/"*) words="--help --certificate-id --new-status --new-auto-registration-status" ;;
        "describe-ca-certificate/"*) words="--help --certificate-id" ;;
        "list-ca-certificates/"*) words="--help --page-size --ascending-order --no-ascending-order --starting-token --max-items --no-paginate" ;;
        "delete-ca-certificate/"*) words="--help --certificate-id" ;;
        "register-certificate/"*) words="--help --certificate-pem --ca-certificate-pem --status --set-as-active --no-set-as-active" ;;
        "register-certificate-without-ca/"*) words="--help --certificate-pem --status" ;;
        "update-certificate/"*) words="--help --certificate-id --new-status" ;;
        "describe-certificate/"*) words="--help --certificate-id" ;;
        "list-certificates/"*) words="--help --page-size --ascending-order --no-ascending-order --starting-token --max-items --no-paginate" ;;
        "list-certificates-by-ca/"*) words="--help --ca-certificate-id --page-size --ascending-order --no-ascending-order --starting-token --max-items --no-paginate" ;;
        "delete-certificate/"*) words="--help --certificate-id --force-delete --no-force-delete" ;;
        "transfer-certificate/"*) words="--help --certificate-id --target-gateway --transfer-message --outfile" ;;
        "accept-certificate-transfer/"*) words="--help --bundle --set-as-active --no-set-as-active --expect-signer --reply-outfile" ;;
        "reject-certificate-transfer/"*) words="--help --bundle --reject-reason --expect-signer --reply-outfile" ;;
        "cancel-certificate-transfer/"*) words="--help --certificate-id" ;;
        "complete-certificate-transfer/"*) words="--help --reply --expect-signer" ;;
        "describe-endpoint/"*) words="--help --endpoint-type --ca-certificate-outfile" ;;
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
    if [[ -n $files && $cur != -* ]]; then COMPREPLY+=($(compgen -f -- "$cur")); fi
}
complete -F _gatewayctl gatewayctl
